# Sourced by the NIC sbatch scripts: one place for the environment, the scheduler file and TLS.
# Each scheduler job is its own cluster, with its own folder: two clusters of one user never share
# (or delete) each other's scheduler file or certificates.
#
#   NIC_ENV              a virtualenv directory or a conda environment name to activate
#                        (unset: use whatever `dask` and `nic` are on PATH)
#   NIC_SCHEDULER_JOB    job id of the scheduler job whose cluster worker and client jobs join
#                        (unset: your one running or pending nic-scheduler job, found with squeue;
#                        the scheduler job sets it to its own id)
#   NIC_RUN_DIR          the cluster's folder            [~/.nic/<SLURM cluster>-<scheduler job id>]
#   NIC_SCHEDULER_FILE   where the scheduler job writes its address   [$NIC_RUN_DIR/scheduler.json]
#   NIC_TLS              1: TLS with certificates made by the scheduler job; 0: plain TCP  [1]
#   NIC_TLS_DIR          where the scheduler job writes them (private) [$NIC_RUN_DIR/tls]
#   NIC_INTERFACE        network interface for scheduler and workers, e.g. ib0 (unset: default route)
#   NIC_WAIT             seconds a worker or client job waits for the scheduler file [900]
#
# On a login node or in a notebook, join a running cluster with
#   export NIC_SCHEDULER_JOB=<scheduler job id>; source deploy/slurm/nic-job.sh
#   nic compress ... --scheduler-file "$NIC_SCHEDULER_FILE"

if [ -n "${NIC_ENV:-}" ]; then
    if [ -f "$NIC_ENV/bin/activate" ]; then
        # shellcheck disable=SC1091
        . "$NIC_ENV/bin/activate"
    elif command -v conda >/dev/null; then
        eval "$(conda shell.bash hook)"
        conda activate "$NIC_ENV"
    else
        echo "NIC_ENV=$NIC_ENV is neither a virtualenv nor a conda environment" >&2
        exit 2
    fi
fi

find_scheduler_job() {  # the user's one running (or pending) nic-scheduler job, for jobs not told which
    local found
    found=$(squeue -h -u "$(id -un)" -n nic-scheduler -t RUNNING,PENDING -o %i 2>/dev/null | sort -n | tr '\n' ' ')
    found=${found% }
    case "$found" in
        "") echo "nic: no nic-scheduler job of yours is running: submit deploy/slurm/scheduler.sbatch, then export NIC_SCHEDULER_JOB=<its job id>" >&2
            return 3 ;;
        *" "*) echo "nic: several nic-scheduler jobs of yours run ($found): export NIC_SCHEDULER_JOB=<the one to join> before sbatch" >&2
            return 2 ;;
        *) echo "$found" ;;
    esac
}

if [ -n "${NIC_DERIVED_FROM:-}" ] && [ "$NIC_DERIVED_FROM" != "${NIC_SCHEDULER_JOB:-}" ]; then
    unset NIC_RUN_DIR NIC_SCHEDULER_FILE NIC_TLS_DIR NIC_DERIVED_FROM  # derived for another cluster
fi
if [ -z "${NIC_RUN_DIR:-}" ] && { [ -z "${NIC_SCHEDULER_FILE:-}" ] || { [ "${NIC_TLS:-1}" = 1 ] && [ -z "${NIC_TLS_DIR:-}" ]; }; }; then
    if [ -z "${NIC_SCHEDULER_JOB:-}" ]; then  # sourced in a login shell: return, do not end the shell
        NIC_SCHEDULER_JOB=$(find_scheduler_job) || { case $- in *i*) return 2 ;; *) exit 2 ;; esac; }
    fi
    nic_cluster=${SLURM_CLUSTER_NAME:-$(scontrol show config 2>/dev/null | sed -n 's/^ClusterName *= *//p')}
    NIC_RUN_DIR=$HOME/.nic/${nic_cluster:-slurm}-$NIC_SCHEDULER_JOB
    nic_own_run_dir=1  # derived here, not set by hand: the scheduler job may clear and remove it
    export NIC_DERIVED_FROM=$NIC_SCHEDULER_JOB
fi
export NIC_SCHEDULER_JOB NIC_RUN_DIR
NIC_SCHEDULER_FILE=${NIC_SCHEDULER_FILE:-$NIC_RUN_DIR/scheduler.json}
NIC_TLS_DIR=${NIC_TLS_DIR:-$NIC_RUN_DIR/tls}
NIC_WAIT=${NIC_WAIT:-900}
export NIC_SCHEDULER_FILE NIC_TLS_DIR
if [ "${NIC_TLS:-1}" = 1 ]; then
    # Dask config, read by `dask scheduler`, `dask worker`, `dask cuda worker` and `nic` alike: every
    # connection is TLS with this job's certificate (flags would clash with --interface in dask scheduler)
    export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True
    export DASK_DISTRIBUTED__COMM__TLS__CA_FILE="$NIC_TLS_DIR/ca.pem"
    for role in SCHEDULER WORKER CLIENT; do
        export "DASK_DISTRIBUTED__COMM__TLS__${role}__CERT=$NIC_TLS_DIR/cert.pem"
        export "DASK_DISTRIBUTED__COMM__TLS__${role}__KEY=$NIC_TLS_DIR/key.pem"
    done
fi
iface_args=()
if [ -n "${NIC_INTERFACE:-}" ]; then iface_args=(--interface "$NIC_INTERFACE"); fi

make_certificates() {  # a self-signed key and certificate for this scheduler job, readable by its owner only
    if [ -e "$NIC_TLS_DIR/key.pem" ]; then  # another cluster's, perhaps live: never overwrite it
        echo "nic: NIC_TLS_DIR=$NIC_TLS_DIR already holds a key (another cluster's?): unset NIC_TLS_DIR for a folder of this job's own" >&2
        exit 2
    fi
    (umask 077 && mkdir -p "$NIC_TLS_DIR" &&
        openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days 30 -subj "/CN=nic-dask-${SLURM_JOB_ID:-local}" \
            -keyout "$NIC_TLS_DIR/key.pem" -out "$NIC_TLS_DIR/cert.pem" 2>/dev/null &&
        cp "$NIC_TLS_DIR/cert.pem" "$NIC_TLS_DIR/ca.pem")
}

wait_for_scheduler() {  # until the scheduler job has written its file (and its certificates)
    local waited=0
    until [ -s "$NIC_SCHEDULER_FILE" ] && { [ "${NIC_TLS:-1}" != 1 ] || [ -s "$NIC_TLS_DIR/ca.pem" ]; }; do
        if [ "$waited" -ge "$NIC_WAIT" ]; then
            echo "nic: no scheduler file at $NIC_SCHEDULER_FILE after ${NIC_WAIT}s: is scheduler job ${NIC_SCHEDULER_JOB:-?} running?" >&2
            exit 3
        fi
        sleep 2
        waited=$((waited + 2))
    done
    echo "nic: joining the cluster of scheduler job ${NIC_SCHEDULER_JOB:-?}: $NIC_SCHEDULER_FILE"
}
