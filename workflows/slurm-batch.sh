#!/usr/bin/env bash
#SBATCH --job-name=fcnpipe
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=14:00:00
#SBATCH --output=fcnpipe-%j.log
# The overnight batch on a SLURM cluster: this small job runs `fcnpipe batch`, which submits the
# worker jobs of configs/cluster.yaml through dask-jobqueue and gives them back when done.
#
#   sbatch workflows/slurm-batch.sh /data/scans models/tumour.pt /data/maps [extra fcnpipe flags]
#
# Submit it again after a failure or a timeout: complete stores are skipped, the rest resume.
#
# The Dask scheduler runs in this job and speaks TLS only: the run makes its own certificate authority,
# certificate and key, dask-jobqueue writes them to cluster.credentials_directory (configs/cluster.yaml,
# on the shared filesystem, readable by you only, removed at the end) and each worker job's script
# names those files (--tls-ca-file, --tls-cert, --tls-key). Nobody else can join it or send it work.
# The dashboard listens on this job's node, on loopback: the log's "compute" line has the tunnel,
#   ssh -N -L PORT:127.0.0.1:PORT NODE     (add -J LOGIN-NODE where the nodes are reached through it)
# then open http://127.0.0.1:PORT/status on your machine.
set -euo pipefail
scans=${1:?scans folder}; model=${2:?model}; out=${3:?output folder}; shift 3
source ~/fcnpipe/.venv/bin/activate
exec fcnpipe batch "$scans" -m "$model" -o "$out" -c configs/pathology.yaml -c configs/cluster.yaml --no-progress "$@"
