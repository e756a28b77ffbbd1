"""Options shared by the commands that run on a Dask cluster (compress, train), and `nic cluster`."""

from __future__ import annotations

import json
import sys

import click

from nic_pipeline.cli.group import main
from nic_pipeline.cli.types import COUNT


def cluster_options(command):
    """Options shared by compress and train: worker jobs on a batch system, and TLS certificates."""
    options = [
        click.option("--cluster", "batch_system", type=click.Choice(["slurm", "pbs"]), default=None,
                     help="Submit worker jobs to this batch system (dask-jobqueue; settings in "
                          "~/.config/dask/jobqueue.yaml)."),
        click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Worker jobs (--cluster); the most with --adapt."),
        click.option("--adapt", is_flag=True, help="Scale worker jobs between 1 and --jobs with the load (--cluster)."),
        click.option("--gpus-per-job", type=click.IntRange(min=0), default=None,
                     help="GPUs per worker job, one `dask cuda worker` each (--cluster); 0: CPU worker jobs. "
                          "Default: 1 where the SLURM partition's nodes have GPUs (sinfo), else 0; 1 on PBS."),
        click.option("--cpu-jobs", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Extra CPU worker jobs for the CPU-side stages (--cluster; jobqueue.<system>-cpu config)."),
        click.option("--tls/--no-tls", default=True, show_default=True,
                     help="With --cluster and no certificates: TLS with temporary ones."),
        click.option("--tls-ca-file", type=click.Path(exists=True), default=None, help="CA certificate (PEM) for TLS."),
        click.option("--tls-cert", type=click.Path(exists=True), default=None, help="Certificate (PEM) for TLS."),
        click.option("--tls-key", type=click.Path(exists=True), default=None, help="Private key (PEM) for TLS."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _connect_options(batch_system, jobs, adapt, gpus_per_job, cpu_jobs, tls, tls_ca_file, tls_cert, tls_key) -> dict:
    """connect() keywords from the cluster options."""
    from nic_pipeline.runtime.cluster import tls_security
    from nic_pipeline.runtime.jobqueue import BatchSettings

    batch = None
    if batch_system:
        batch = BatchSettings(batch_system, jobs=jobs, adapt=adapt, gpus_per_job=gpus_per_job, cpu_jobs=cpu_jobs, tls=tls)
    return {"security": tls_security(tls_ca_file, tls_cert, tls_key), "batch": batch}


@main.group("cluster")
def cluster_group():
    """Keep a local cluster warm between commands (start, status, stop).

    `nic compress`, `nic train` and the others given no --scheduler/--scheduler-file/--cluster use
    it while it runs: no cluster start and no encoder load per command."""


@cluster_group.command("start")
@click.option("--workers", type=COUNT, default=None, help="Workers, as `nic compress --workers` (default: one per core, or per GPU).")
@click.option("--threads-per-worker", type=COUNT, default=1, show_default=True, help="Task threads per worker.")
def cluster_start(workers, threads_per_worker):
    """Start a local cluster that outlives the command; later commands use it."""
    from nic_pipeline.runtime.warm import cluster_file, start

    record = start(workers, threads_per_worker)
    click.echo(f"cluster: {record['address']}, {record['n_workers']} workers ({record['total_threads']} threads)")
    click.echo(f"dashboard: {record['nic']['dashboard']}")
    click.echo(f"scheduler file: {cluster_file()} (nic cluster stop to end it)")


@cluster_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def cluster_status(as_json):
    """The warm cluster: address, uptime, workers and the encoders loaded on them."""
    from nic_pipeline.runtime.warm import status

    found = status()
    if as_json:
        click.echo(json.dumps(found, indent=2))
    elif found is None:
        click.echo("no warm cluster (nic cluster start starts one)")
    else:
        click.echo(f"cluster: {found['address']}, up {_duration(found['uptime_s'])}, {len(found['workers'])} workers")
        click.echo(f"dashboard: {found['dashboard']}")
        click.echo(f"scheduler file: {found['file']}")
        for address, worker in found["workers"].items():
            encoders = ", ".join(worker.get("encoders", [])) or "none"
            click.echo(f"  {address}  pid {worker.get('pid', '?')}  {worker['nthreads']} threads  "
                       f"encoders loaded: {encoders}")
    if found is None:
        sys.exit(1)


@cluster_group.command("stop")
def cluster_stop():
    """Close the warm cluster's scheduler and workers and remove its scheduler file."""
    from nic_pipeline.runtime.warm import stop

    address = stop()
    click.echo(f"cluster: stopped {address}" if address else "no warm cluster was running")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
