#!/usr/bin/env bash
#SBATCH --job-name=fcnpipe-gpu
#SBATCH --cpus-per-task=2
#SBATCH --mem=8G
#SBATCH --time=14:00:00
#SBATCH --output=fcnpipe-gpu-%j.log
# As slurm-batch.sh, on GPU jobs (configs/cluster-gpu.yaml: one GPU per worker job, half precision),
# TLS and the dashboard on loopback included.
#
#   sbatch workflows/slurm-gpu.sh /data/scans models/tumour.pt /data/maps
set -euo pipefail
scans=${1:?scans folder}; model=${2:?model}; out=${3:?output folder}; shift 3
source ~/fcnpipe/.venv/bin/activate
exec fcnpipe batch "$scans" -m "$model" -o "$out" -c configs/pathology.yaml -c configs/cluster-gpu.yaml --no-progress "$@"
