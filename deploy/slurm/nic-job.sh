# Sourced by the NIC sbatch scripts: one place for the environment, the scheduler file and TLS.
#
#   NIC_ENV              a virtualenv directory or a conda environment name to activate
#                        (unset: use whatever `dask` and `nic` are on PATH)
#   NIC_SCHEDULER_FILE   where the scheduler job writes its address   [~/nic-scheduler.json]
#   NIC_TLS              1: TLS with certificates made by the scheduler job; 0: plain TCP  [1]
#   NIC_TLS_DIR          where the scheduler job writes them (private) [~/.nic-tls]
#   NIC_INTERFACE        network interface for scheduler and workers, e.g. ib0 (unset: default route)
#   NIC_WAIT             seconds a worker or client job waits for the scheduler file [900]

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

NIC_SCHEDULER_FILE=${NIC_SCHEDULER_FILE:-$HOME/nic-scheduler.json}
NIC_TLS_DIR=${NIC_TLS_DIR:-$HOME/.nic-tls}
NIC_WAIT=${NIC_WAIT:-900}
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
    rm -rf "$NIC_TLS_DIR"
    (umask 077 && mkdir -p "$NIC_TLS_DIR" &&
        openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days 30 -subj "/CN=nic-dask-${SLURM_JOB_ID:-local}" \
            -keyout "$NIC_TLS_DIR/key.pem" -out "$NIC_TLS_DIR/cert.pem" 2>/dev/null &&
        cp "$NIC_TLS_DIR/cert.pem" "$NIC_TLS_DIR/ca.pem")
}

wait_for_scheduler() {  # until the scheduler job has written its file (and its certificates)
    local waited=0
    until [ -s "$NIC_SCHEDULER_FILE" ] && { [ "${NIC_TLS:-1}" != 1 ] || [ -s "$NIC_TLS_DIR/ca.pem" ]; }; do
        if [ "$waited" -ge "$NIC_WAIT" ]; then
            echo "no scheduler file at $NIC_SCHEDULER_FILE after ${NIC_WAIT}s: is the scheduler job running?" >&2
            exit 3
        fi
        sleep 2
        waited=$((waited + 2))
    done
}
