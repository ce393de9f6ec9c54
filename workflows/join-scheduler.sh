#!/usr/bin/env bash
# Join a Dask scheduler that is already running (started by you, by a colleague's job, or by
# dask-gateway): the batch's tasks go to its workers.
#
#   workflows/join-scheduler.sh tcp://node17:8786 /data/scans models/tumour.pt /data/maps
#
# Start one by hand, e.g. on SLURM:
#   srun -N1 dask scheduler --scheduler-file ~/scheduler.json &
#   srun -N4 --cpus-per-task=16 dask worker --scheduler-file ~/scheduler.json --nthreads 16 &
# (GPU workers: `dask worker ... --nthreads 4 --resources GPU=1` and pass --device cuda.)
# The workers need the same fcnpipe installation and the same paths to the scans and outputs.
set -euo pipefail
address=${1:?scheduler address}; scans=${2:?scans folder}; model=${3:?model}; out=${4:?output folder}; shift 4
exec fcnpipe batch "$scans" -m "$model" -o "$out" --scheduler "$address" --no-progress "$@"
