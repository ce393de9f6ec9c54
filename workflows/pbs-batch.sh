#!/usr/bin/env bash
#PBS -N fcnpipe
#PBS -l select=1:ncpus=2:mem=8gb
#PBS -l walltime=14:00:00
#PBS -j oe
# The overnight batch on a PBS cluster: as slurm-batch.sh, with compute.scheduler pbs (TLS between the
# scheduler in this job and the worker jobs, the certificates' files named by each job script; the
# dashboard on this job's loopback, reached with the ssh -N -L line of the log).
#
#   qsub -v SCANS=/data/scans,MODEL=models/tumour.pt,OUT=/data/maps workflows/pbs-batch.sh
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
source ~/fcnpipe/.venv/bin/activate
exec fcnpipe batch "$SCANS" -m "$MODEL" -o "$OUT" -c configs/pathology.yaml -c configs/cluster.yaml \
  --scheduler pbs --no-progress
