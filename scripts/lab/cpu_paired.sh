#!/usr/bin/env bash
# A retrained nano against the shipped one, paired, on this machine's CPU (docs/lab/nano-v2.md): both
# evaluated the same way here, so that the comparison carries no device or dtype difference.
#
#   bash scripts/lab/cpu_paired.sh DATA OUT MODEL [MODEL ...]
#
# DATA: the prepared datasets (vqa-rad/, slake/, pathvqa/, pneumoniamnist/; scripts/nano.sh's
# prepare stage). Each MODEL (a model folder such as a fetched export/nano, or a bundled name; the
# first is the reference, e.g. nano) is evaluated into OUT/NAME/ (NAME: its position, 0 for the
# first, or NAME=MODEL to name it) on VQA-RAD, SLAKE and PneumoniaMNIST, VQA-RAD and SLAKE with
# --shuffle-images, the yes/no label probe in float32, then PathVQA's held-out part. Evaluations
# resume, so a rerun only does what is missing. Then OUT/compare.txt: each model against the first
# (medmoe compare, paired 95% intervals) and what the image adds to each (asked against shuffled).
# 2-core CPU: about 12 minutes a model.
set -uo pipefail
DATA=${1:?DATA}; OUT=${2:?OUT}; shift 2
[ $# -ge 1 ] || { echo "usage: bash scripts/lab/cpu_paired.sh DATA OUT MODEL [MODEL ...]" >&2; exit 2; }
M=${MEDMOE:-python -m medmoe}
EVAL="--batch-size 64 --max-new-tokens 32"
names=()
i=0
for spec in "$@"; do
  name=$i; model=$spec
  case $spec in *=*) name=${spec%%=*}; model=${spec#*=} ;; esac
  names+=("$name")
  o=$OUT/$name
  mkdir -p "$o"
  echo "== $name: $model"
  $M eval --model "$model" --data "$DATA/vqa-rad" --split test $EVAL --out "$o/vqa-rad" > "$o/vqa-rad.log" 2>&1
  $M eval --model "$model" --data "$DATA/slake" --split test $EVAL --out "$o/slake" > "$o/slake.log" 2>&1
  $M eval --model "$model" --data "$DATA/pneumoniamnist" --split validation --out "$o/pn" > "$o/pn.log" 2>&1
  for ds in vqa-rad slake; do
    $M eval --model "$model" --data "$DATA/$ds" --split test $EVAL --shuffle-images --out "$o/$ds-shuffled" \
      > "$o/$ds-shuffled.log" 2>&1
    [ -f "$DATA/$ds/label-questions-test.jsonl" ] || $M data label-questions "$DATA/$ds" --split test > /dev/null
    $M eval --model "$model" --data "$DATA/$ds/label-questions-test.jsonl" --split test --max-new-tokens 8 \
      --dtype float32 --out "$o/probe-$ds" > "$o/probe-$ds.log" 2>&1
  done
  $M eval --model "$model" --data "$DATA/pathvqa" --split heldout $EVAL --out "$o/pathvqa" > "$o/pathvqa.log" 2>&1
  i=$((i + 1))
done

ref=${names[0]}
{
  for name in "${names[@]}"; do
    for ds in vqa-rad slake; do
      echo "== $name: what the image adds on $ds (shuffled -> asked)"
      $M compare "$OUT/$name/$ds-shuffled" "$OUT/$name/$ds" | grep -E "closed accuracy|open recall"
    done
    [ "$name" = "$ref" ] && continue
    for run in vqa-rad slake pathvqa pn vqa-rad-shuffled slake-shuffled probe-vqa-rad probe-slake; do
      echo "== $run: $ref -> $name"
      $M compare "$OUT/$ref/$run" "$OUT/$name/$run" | grep -E "closed accuracy|open recall|balanced acc|McNemar"
    done
  done
} | tee "$OUT/compare.txt"
