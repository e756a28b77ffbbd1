"""Settings of one Dask worker process that Dask's defaults get wrong for this pipeline.

Called from the worker side (``NicWorker.setup``, training tasks), once per process; each is
idempotent and says in its docstring what it fixes and how it was measured.
"""

from __future__ import annotations

import ast
import ctypes
import functools
import threading
import warnings

GLIBC_MMAP_MAX = 32 * 1024 * 1024  # the largest mmap threshold glibc accepts on 64-bit
WORKER_TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let this process's glibc allocator reuse what it frees instead of handing it back to the
    OS at once; True when it could be set (glibc), False elsewhere.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to return a worker's freed data
    quickly). Setting it also freezes glibc's mmap threshold at 128 KiB, so every decoded tile,
    band and activation over 128 KiB is a fresh ``mmap``, page-faulted and zeroed again at every
    batch: encoding ran 20-25 % slower (docs/benchmarks.md). Compression workers hold no task
    data, so allocations up to 32 MiB come from the heap and up to 256 MiB of free heap is kept.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, malloc.h
        return bool(libc.mallopt(m_mmap_threshold, GLIBC_MMAP_MAX) and libc.mallopt(m_trim_threshold, WORKER_TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False


_AST_LOCK = threading.RLock()


def serialise_ast_parsing() -> None:
    """Let one thread at a time build an AST in this process.

    CPython keeps the AST constructor's recursion counter per interpreter, not per thread
    (gh-106905): two threads in ``ast.parse`` at once can fail with "SystemError: AST constructor
    recursion depth mismatch". A compression worker imports torch in a background thread (its
    ``torch._jit_internal`` parses source) while a task imports scikit-image or cuCIM (their
    lazy loaders parse stub files); CI saw a slide fail that way. Parsing happens only at
    import, so the lock costs nothing measurable.
    """
    if getattr(ast.parse, "_serialised", False):
        return
    parse = ast.parse

    @functools.wraps(parse)
    def serialised(*args, **kwargs):
        with _AST_LOCK:
            return parse(*args, **kwargs)

    serialised._serialised = True
    ast.parse = serialised


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning for users as one line, without Python's file, line and source."""
    return f"warning: {message}\n"


def warnings_in_one_line() -> None:
    """Warnings of this process (the ``nic`` command, or a worker that reports a slide) as one
    ``warning:`` line each, like the command's own messages."""
    warnings.formatwarning = one_line_warning

