#!/usr/bin/env bash
# On the GPU machine, after `DETACH=1 bash scripts/lab/gpu_run.sh STAGES`: wait up to SECONDS (default
# 540, inside a 600 s call) for the background run, print its progress (the newest training log
# line, the last lines of its output), and, once it has ended, copy what it packed (log.txt,
# results.tgz, delta.part??) into this call's $OUT. Exit status 0 when it has ended, 10 while it
# still runs (call again), 3 when no run was started.
#
#   bash scripts/lab/gpu_wait.sh 540
set -uo pipefail
STAGE=${STAGE:-/root/stage}; OUT=${OUT:?set OUT to the folder that comes back}; limit=${1:-540}
pid=$(cat "$STAGE/run.pid" 2>/dev/null) || { echo "no background run in $STAGE: start one with DETACH=1 bash scripts/lab/gpu_run.sh STAGES"; exit 3; }
running() { [ ! -f "$STAGE/run.done" ] && kill -0 "$pid" 2>/dev/null; }
start=$(date +%s)
while running && [ $(( $(date +%s) - start )) -lt "$limit" ]; do sleep 2; done
newest=$(ls -t "$STAGE"/work/runs/*/*/metrics.jsonl 2>/dev/null | head -1)
[ -n "$newest" ] && echo "${newest#"$STAGE"/work/}: $(tail -1 "$newest")"
if running; then
  echo "still running after $(( $(date +%s) - start )) s; call again"
  tail -5 "$STAGE/out/log.txt" 2>/dev/null
  exit 10
fi
cp "$STAGE"/out/* "$OUT"/ 2>/dev/null
tail -30 "$STAGE/run.log"
