#!/usr/bin/env bash
# On the GPU machine (see scripts/gpu_payload.sh): assemble the payload once in $STAGE (it
# survives between back-to-back calls on one machine), then run scripts/nano.sh STAGES under a
# time budget (BUDGET seconds, default 560: a call may last 600) and pack what came out into $OUT:
# log.txt, results.tgz (metrics, predictions, plots, logs; no weights) and, once exported, the
# shipped delta as delta.part?? (15 MB each: cat delta.part?? | tar xf -). Stages resume.
#
#   cp .gpu/payload.partaa $STAGE/            # call 1, carrying .gpu/payload.partaa (likewise ab)
#   bash scripts/gpu_run.sh prepare train     # last call, carrying the last part, .gpu/payload.sha256, .gpu/whl
set -uo pipefail
REPO=$PWD; STAGE=${STAGE:-/root/stage}; OUT=${OUT:?set OUT to the folder that comes back}
if [ ! -f "$STAGE/ready" ]; then
  ls "$STAGE"/payload.part?? >/dev/null || { echo "$STAGE holds no payload parts: copy them in first"; exit 3; }
  cat "$STAGE"/payload.part?? > "$STAGE/payload.tar"
  echo "$(cat .gpu/payload.sha256)  $STAGE/payload.tar" | sha256sum -c - || exit 4
  tar xf "$STAGE/payload.tar" -C "$STAGE" && rm "$STAGE/payload.tar" "$STAGE"/payload.part??
  python3 -m pip install -q --no-deps --target "$STAGE/site" "$STAGE"/*.whl .gpu/whl/*.whl || exit 5
  touch "$STAGE/ready"
fi
export PYTHONPATH="$STAGE/site:$REPO" MEDMOE_CACHE="$STAGE/cache" MEDMOE="python3 -m medmoe"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
timeout --signal=TERM --kill-after=20 "${BUDGET:-560}" bash scripts/nano.sh "$STAGE/data" "$STAGE/work" "$@" 2>&1 \
  | grep -v -E "it/s\]|s/it\]|q/s\]" | tail -c 200000 > "$OUT/log.txt"
echo "stages $* rc=${PIPESTATUS[0]} wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/log.txt"
cd "$STAGE/work" || exit 0
tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='checkpoint*' --exclude=data runs evals 2>/dev/null
if [ -d export/nano ]; then tar cf - export/nano | split -b 15M - "$OUT/delta.part"; fi
tail -25 "$OUT/log.txt"
