#!/usr/bin/env bash
# On the GPU machine (see scripts/lab/gpu_payload.sh): assemble the payload once in $STAGE (it
# survives between back-to-back calls on one machine), then run scripts/nano.sh STAGES under a
# time budget (BUDGET seconds, default 560: a call may last 600) and pack what came out into $OUT:
# log.txt, results.tgz (metrics, predictions, plots, logs; no weights) and, once exported, the
# shipped delta as delta.part?? (15 MB each: cat delta.part?? | tar xf -). Stages resume.
#
#   (PAYLOAD_DIR: where the parts and payload.sha256 are, default .gpu; .gpu/eval for gpu_eval_payload.sh's)
#   cp .gpu/payload.partaa $STAGE/            # call 1, carrying .gpu/payload.partaa (likewise ab, ac: one 30 MB part a call)
#   bash scripts/lab/gpu_run.sh prepare train     # last call, carrying the last part, .gpu/payload.sha256, .gpu/whl
#
# Runs longer than one call: DETACH=1 starts the stages in the background from a copy of the repo
# (so that the next call's fresh working tree cannot change them mid-run) and returns; each
# following call runs `bash scripts/lab/gpu_wait.sh [SECONDS]`, which waits, shows progress, and once
# the run has ended copies what it packed into that call's $OUT. BUDGET then defaults to 1500 s.
# Call back-to-back: an idle machine is given back, and the run with it.
set -uo pipefail
REPO=$PWD; STAGE=${STAGE:-/root/stage}; OUT=${OUT:?set OUT to the folder that comes back}
if [ ! -f "$STAGE/ready" ]; then
  ls "$STAGE"/payload.part?? >/dev/null || { echo "$STAGE holds no payload parts: copy them in first"; exit 3; }
  cat "$STAGE"/payload.part?? > "$STAGE/payload.tar"
  echo "$(cat "${PAYLOAD_DIR:-.gpu}/payload.sha256")  $STAGE/payload.tar" | sha256sum -c - || exit 4
  tar xf "$STAGE/payload.tar" -C "$STAGE" && rm "$STAGE/payload.tar" "$STAGE"/payload.part??
  python3 -m pip install -q --no-deps --target "$STAGE/site" "$STAGE"/*.whl .gpu/whl/*.whl || exit 5
  bash scripts/lab/place_prepared.sh "$STAGE" || exit 6  # data prepared where the payload was built
  touch "$STAGE/ready"
fi
[ $# -gt 0 ] || exit 0  # no stages: the payload assembled, nothing run
if [ "${DETACH:-0}" = 1 ]; then
  rm -rf "$STAGE/repo" "$STAGE/out" "$STAGE/run.pid" "$STAGE/run.done" && mkdir -p "$STAGE/repo" "$STAGE/out"
  tar cf - --exclude=./.git --exclude=./.gpu --exclude=./.venv . | tar xf - -C "$STAGE/repo"
  (cd "$STAGE/repo" && OUT="$STAGE/out" DETACH=0 BUDGET=${BUDGET:-1500} setsid nohup bash scripts/lab/gpu_run.sh "$@" \
     > "$STAGE/run.log" 2>&1 < /dev/null &)
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$STAGE/run.pid" ] && break; sleep 0.5; done
  echo "started stages $* in the background (pid $(cat "$STAGE/run.pid")); next: bash scripts/lab/gpu_wait.sh"
  exit 0
fi
echo $$ > "$STAGE/run.pid"
trap 'date +%s > "$STAGE/run.done"' EXIT  # gpu_wait.sh's sign that the run has ended
export PYTHONPATH="$STAGE/site:$REPO" MEDMOE_CACHE="$STAGE/cache" MEDMOE=${MEDMOE:-python3 -m medmoe}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
timeout --signal=TERM --kill-after=20 "${BUDGET:-560}" bash scripts/nano.sh "$STAGE/data" "$STAGE/work" "$@" 2>&1 \
  | grep --line-buffered -v -E "it/s\]|s/it\]|q/s\]" > "$OUT/log.txt"  # written as it goes: gpu_wait.sh shows it
rc=${PIPESTATUS[0]}
echo "stages $* rc=$rc wall=$(( $(date +%s) - start ))s" | tee -a "$OUT/log.txt"
cd "$STAGE/work" || exit "$rc"
tar czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='checkpoint*' --exclude=data runs evals 2>/dev/null
if [ -d export/nano ]; then tar cf - export/nano | split -b 15M - "$OUT/delta.part"; fi
tail -25 "$OUT/log.txt"
exit "$rc"
