#!/usr/bin/env bash
# Overnight run on one workstation: every slide in a folder, one Zarr store each.
#
#   workflows/overnight-local.sh SLIDES_DIR MODEL.pt OUT_DIR [extra fcnpipe run flags...]
#
# A slide whose store is already complete is skipped, so the script can simply be started again
# after an interruption (an unfinished store is redone with --overwrite). A slide that fails is
# logged and the others go on; the exit code is 1 if any slide failed.
set -uo pipefail
slides=${1:?slides folder}; model=${2:?model}; out=${3:?output folder}; shift 3
mkdir -p "$out"
failed=0
for slide in "$slides"/*.{svs,ndpi,tif,tiff}; do
  [ -e "$slide" ] || continue
  name=$(basename "${slide%.*}")
  store="$out/$name.zarr"
  if python3 - "$store" <<'PY' 2>/dev/null; then echo "skip  $slide (complete)"; continue; fi
import sys, zarr
sys.exit(0 if zarr.open_group(sys.argv[1], mode="r").attrs["fcnpipe"]["complete"] else 1)
PY
  echo "start $slide"
  if ! fcnpipe run "$slide" -m "$model" -o "$store" --overwrite --no-progress "$@" 2>>"$out/$name.log"; then
    echo "FAIL  $slide: $(tail -n 1 "$out/$name.log")"
    failed=1
  fi
done
exit $failed
