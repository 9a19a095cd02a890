#!/usr/bin/env bash
# On the GPU machine, once the payload is extracted into STAGE: the datasets prepared where the
# payload was built (STAGE/prepared, scripts/lab/gpu_payload.sh) move to STAGE/work/data, their
# image roots pointed at the stage's copy of the images. Nothing to do for a payload without them.
set -euo pipefail
STAGE=${1:?usage: place_prepared.sh STAGE}
[ -d "$STAGE/prepared" ] || exit 0
built=$(cat "$STAGE/prepared/.built_in")
sed -i "s#$built/work/data#$STAGE/work/data#g; s#$built/data#$STAGE/data#g" "$STAGE"/prepared/*/dataset.json
mkdir -p "$STAGE/work" && rm -rf "$STAGE/work/data" && mv "$STAGE/prepared" "$STAGE/work/data"
