#!/usr/bin/env bash
# Overnight run on one workstation: every slide in a folder, one Zarr store each, a manifest.
#
#   workflows/overnight-local.sh SLIDES_DIR MODEL.pt OUT_DIR [extra fcnpipe flags...]
#
# Start it again after a crash, a kill or a power cut: complete stores are skipped and interrupted
# ones resume chunk by chunk. A slide that fails is listed in OUT_DIR/manifest.csv with its reason and
# the others go on; the exit code is 1 if any slide failed. The log is OUT_DIR/fcnpipe-batch.log.
set -euo pipefail
slides=${1:?slides folder}; model=${2:?model}; out=${3:?output folder}; shift 3
exec fcnpipe batch "$slides" -m "$model" -o "$out" --no-progress "$@"
