#!/usr/bin/env bash
# Join a Dask scheduler that is already running (started by you, by a colleague's job, or by
# dask-gateway): the batch's tasks go to its workers.
#
#   workflows/join-scheduler.sh tls://node17:8786 /data/scans models/tumour.pt /data/maps -c ~/.fcnpipe/tls.yaml
#
# Start one by hand with TLS: anyone who reaches a plain (tcp://) scheduler's port can run code as you.
# Once, a certificate that is its own authority, and a config that gives fcnpipe the same files:
#   mkdir -p -m 700 ~/.fcnpipe && cd ~/.fcnpipe
#   openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=fcnpipe-dask -keyout key.pem -out cert.pem
#   printf 'compute:\n  tls_ca_file: ~/.fcnpipe/cert.pem\n  tls_cert: ~/.fcnpipe/cert.pem\n  tls_key: ~/.fcnpipe/key.pem\n' > tls.yaml
# Then, e.g. on SLURM (the dashboard on the scheduler node's loopback: ssh -N -L 8787:127.0.0.1:8787 NODE):
#   tls="--tls-ca-file $HOME/.fcnpipe/cert.pem --tls-cert $HOME/.fcnpipe/cert.pem --tls-key $HOME/.fcnpipe/key.pem"
#   srun -N1 dask scheduler --protocol tls $tls --dashboard-address 127.0.0.1:8787 --scheduler-file ~/scheduler.json &
#   srun -N4 --cpus-per-task=16 dask worker --scheduler-file ~/scheduler.json --nthreads 16 $tls &
# (GPU workers: `dask worker ... --nthreads 4 --resources GPU=1` and pass --device cuda.)
# A tcp:// address still works, for a scheduler on a network nobody else reaches.
# The workers need the same fcnpipe installation and the same paths to the scans and outputs.
set -euo pipefail
address=${1:?scheduler address}; scans=${2:?scans folder}; model=${3:?model}; out=${4:?output folder}; shift 4
exec fcnpipe batch "$scans" -m "$model" -o "$out" --scheduler "$address" --no-progress "$@"
