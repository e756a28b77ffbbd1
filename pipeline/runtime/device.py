"""Which device and which precision a process computes with, decided in one place.

Every process decides for itself from what it has (a Dask worker on a GPU node and one on a CPU
node answer differently), so nothing here is decided once for a whole cluster:

* device: ``cuda`` when torch sees a GPU (dask-cuda pins one per worker), else ``cpu``;
* precision ``auto``: fp16 autocast on GPUs with fp16 tensor cores (compute capability 7.0+:
  V100, T4, A100, H100), bf16 autocast on CPUs with native bf16 (AVX-512 BF16 or AMX), fp32
  elsewhere. Emulated bf16 on an AVX2-only CPU runs about 5x slower than fp32.
"""

from __future__ import annotations

import contextlib
import functools
import os

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def gpu_count() -> int:
    """CUDA devices torch can use here (0 with a CPU-only build or without a driver)."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken driver means the same as none
        return 0


def nvml_gpu_count() -> int:
    """GPUs that dask-cuda would give workers: NVML's count (dask-cuda's own source), limited to
    ``CUDA_VISIBLE_DEVICES`` when it is set; 0 without NVML (pynvml comes with dask-cuda). Never
    imports torch, so the client that starts the embedded cluster stays light."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        from distributed.diagnostics import nvml

        count = nvml.device_get_count()
    except Exception:  # a broken driver means the same as none
        return 0
    if visible is not None:
        return min(count, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))
    return count


@functools.cache
def cupy_gpu() -> bool:
    """Whether CuPy can run kernels here (it imports without a GPU, but every kernel fails)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity (what SLURM or taskset gave the job), not every
    core of the node."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_device(wanted: str = "auto") -> str:
    """``cuda`` or ``cpu``: ``auto`` picks the GPU when torch sees one in this process."""
    return _resolve(wanted, lambda: gpu_count() > 0)


def resolve_array_device(wanted: str = "auto") -> str:
    """``cuda`` or ``cpu`` for array work (cuCIM reads, CuPy masks): ``auto`` picks the GPU when
    CuPy can run kernels here. Never imports torch (seconds), so a task that only reads and
    masks, such as tissue detection, does not wait for it."""
    return _resolve(wanted, cupy_gpu)


def _resolve(wanted: str, has_gpu) -> str:
    """``wanted`` checked; ``auto`` becomes ``cuda`` when ``has_gpu()``, else ``cpu``."""
    if wanted not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {wanted!r}")
    if wanted != "auto":
        return wanted
    return "cuda" if has_gpu() else "cpu"


def torch_device(wanted: str = "auto"):
    """:func:`resolve_device` as a ``torch.device``."""
    import torch

    return torch.device(resolve_device(wanted))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True on CPUs that compute bf16 in hardware (AVX-512 BF16 or AMX).

    ``NIC_CPU_BF16=0`` or ``1`` in a worker's environment overrides the detection (for CPUs whose
    flags are hidden by a virtual machine, or to compare the two on one machine).
    """
    forced = os.environ.get("NIC_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return bool(cpu_flags() & NATIVE_BF16_FLAGS)


def gpu_has_fp16_tensor_cores(index: int = 0) -> bool:
    """True on GPUs of compute capability 7.0 or newer."""
    import torch

    return torch.cuda.get_device_capability(index) >= (7, 0)


def resolve_precision(precision: str, device: str) -> str:
    """The autocast precision this process runs: ``auto`` follows the hardware (module docs)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16" if gpu_has_fp16_tensor_cores() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: str, precision: str):
    """The context that runs torch at ``precision`` (a resolved one: fp32, bf16 or fp16) on
    ``device``: nothing for fp32, else ``torch.autocast`` with that dtype."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device, dtype=dtype)
