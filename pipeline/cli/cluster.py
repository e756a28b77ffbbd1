"""Options shared by the commands that run on a Dask cluster (compress, train)."""

from __future__ import annotations

import click


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
