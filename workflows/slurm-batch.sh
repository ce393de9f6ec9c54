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
set -euo pipefail
scans=${1:?scans folder}; model=${2:?model}; out=${3:?output folder}; shift 3
source ~/fcnpipe/.venv/bin/activate
exec fcnpipe batch "$scans" -m "$model" -o "$out" -c configs/pathology.yaml -c configs/cluster.yaml --no-progress "$@"
