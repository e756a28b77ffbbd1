"""Checks made on the client before a graph is submitted, so a job fails in seconds with one
clear line instead of hours later on a worker.

* paths are made absolute on the client (a worker's working directory is not the user's);
* the workers can see them (a shared file system mounted everywhere);
* the client and every worker run the same versions of the packages that decide the numbers;
* enough workers have joined (SLURM starts worker jobs when it pleases);
* a plain-TCP scheduler is named as such (one warning line), before anything is sent to it.
"""

from __future__ import annotations

import json
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from nic_pipeline.errors import NicError

PACKAGES = ("nic-pipeline", "torch", "zarr", "numcodecs", "numpy", "dask", "distributed", "cloudpickle", "msgpack")
"""Packages whose versions must agree between client and workers."""


def absolute(path: str | os.PathLike | None) -> str | None:
    """``path`` made absolute on the client (None stays None)."""
    return None if path is None else str(Path(path).expanduser().resolve())


def package_versions(packages=PACKAGES) -> dict[str, str | None]:
    """Installed version of each package here (None when it is missing)."""
    found = {}
    for name in packages:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def wait_for_workers(client, n: int, timeout: float) -> None:
    """Block until ``n`` workers have joined, or fail saying how many came."""
    if n <= 0:
        return
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError:
        have = len(client.scheduler_info(n_workers=-1)["workers"])
        raise NicError(f"only {have} of {n} Dask workers joined {client.scheduler.address} within {timeout:g} s; "
                       "start workers (deploy/README.md) or lower --wait-workers") from None


def check_versions(client) -> None:
    """Refuse a cluster whose workers run other versions of :data:`PACKAGES` than the client."""
    mine = package_versions()
    theirs = client.run(package_versions)
    lines = [f"{worker}: {name} {got} (client {mine[name]})"
             for worker, versions in sorted(theirs.items())
             for name, got in versions.items() if got != mine[name]]
    if lines:
        shown = "; ".join(lines[:5]) + (f"; and {len(lines) - 5} more" if len(lines) > 5 else "")
        raise NicError(f"the workers run other package versions than this client: {shown}. "
                       "Use one environment for client and workers (deploy/README.md)")


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def _sample(paths: list[str], most: int) -> list[str]:
    """At most ``most`` of ``paths``, spread over the list (10,000 stats per worker would load a
    shared file system's metadata server for nothing)."""
    if len(paths) <= most:
        return list(paths)
    step = len(paths) / most
    return [paths[int(i * step)] for i in range(most)]


def check_visible(client, paths: list[str], what: str = "path", most: int = 64) -> None:
    """Refuse when a worker cannot see one of ``paths`` (absolute; a folder for outputs)."""
    paths = _sample(list(paths), most)
    if not paths:
        return
    unseen = {worker: missing for worker, missing in client.run(_missing, list(paths)).items() if missing}
    if unseen:
        worker, missing = sorted(unseen.items())[0]
        raise NicError(f"worker {worker} cannot see {what} {missing[0]}"
                       f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
                       f"{f'; {len(unseen) - 1} other workers neither' if len(unseen) > 1 else ''}: "
                       "put inputs and outputs on a file system that every node mounts at the same path")


def preflight(client, *, inputs: list[str] = (), outputs: list[str] = (), wait_workers: int = 1,
              timeout: float = 300.0) -> None:
    """All checks, in the order that gives the clearest message first."""
    wait_for_workers(client, wait_workers, timeout)
    check_versions(client)
    check_visible(client, list(inputs), "input")
    folders = [Path(p).parent for p in outputs]
    for folder in folders:  # made here, so that the workers' view of it can be checked
        folder.mkdir(parents=True, exist_ok=True)
    check_visible(client, [str(f) for f in folders], "the folder of output")


def scheduler_address(scheduler: str | None, scheduler_file: str | None) -> str | None:
    """The address a client will connect to: ``--scheduler``, or the one in ``--scheduler-file``
    (None when the file cannot be read yet)."""
    if scheduler:
        return scheduler
    try:
        with open(os.path.expanduser(scheduler_file)) as handle:
            return json.load(handle).get("address")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def warn_unencrypted(scheduler: str | None, scheduler_file: str | None = None) -> None:
    """One line of warning when the scheduler is plain TCP: whoever reaches its port can run code as
    its user, and slides and codes cross the network as they are."""
    address = scheduler_address(scheduler, scheduler_file)
    if not address or "://" in address and not address.startswith("tcp://"):
        return  # tls://, ucx:// (a fabric, not a shared network), inproc://
    warnings.warn(f"{address} is plain TCP: anyone who can reach it can run code as you, and data crosses the "
                  "network unencrypted; use a tls:// scheduler and certificates (deploy/README.md, "
                  "\"Security on shared clusters\")", stacklevel=2)
