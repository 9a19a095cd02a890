#!/usr/bin/env bash
# Med-MoE-Nano end to end on one GPU: the commands behind docs/RESULTS.md.
#
#   bash scripts/nano.sh DATA_SRC WORK_DIR [STAGE ...]
#
# DATA_SRC holds the datasets as their authors ship them (vqa-rad/, slake/, pathvqa/,
# pneumoniamnist/: the layout of ../shared/data). Stages, in order (default: all but ablations):
#   prepare    medmoe data prepare for the four datasets (PathVQA: 10% of its images held out)
#   train      medmoe train --recipe $RECIPE (phases tower, 1, 2, router, 3; resumable; the tower
#              phase only where the recipe enables it); or in two stages:
#              base (phases tower, 1, 2 and the router) then moe (phase 3), so that ablations can start
#              beside phase 3 once the base is there (several runs share a GPU that nano leaves idle)
#   export     medmoe export: the compact bf16 delta that ships in medmoe/assets/nano
#   eval       medmoe eval of the dense phase-2 model and of the exported Med-MoE (what ships)
#              on every test split (eval-dense, eval-medmoe: one of the two)
#   control    the exported model on VQA-RAD and SLAKE test with each question shown another
#              question's image (--shuffle-images): how much of the score comes from the image
#   probe      the exported model on yes/no questions about VQA-RAD's and SLAKE's test images, made
#              from their labels (medmoe data label-questions): does it read the image at all
#   ablations  phase 3 again without the meta expert, with a plain learned router, with per-sample
#              routing and with full (non-LoRA) experts, each evaluated the same way; each of
#              these four is also a stage of its own: no-meta, plain-router, per-sample, full-experts
#   finetune   the paper's last step: the exported model fine-tuned on each VQA train split alone
#              (FT_EPOCHS, default 3) and evaluated on that dataset's test split
#   per-layer-router  (not in ablations) one router per MoE layer, trained on that layer's FFN inputs
#   per-layer-sample  (after per-layer-router) those routers with per-sample routing
#   pooled     (not in ablations) per-sample routing from the router's own training feature
# TRAIN_ARGS adds recipe overrides to the train stage, e.g. TRAIN_ARGS="phase2.train_vision=true".
# RECIPE (default nano) trains another recipe the same way, e.g. RECIPE=nano-balanced.
# EVAL_DATASETS (default "vqa-rad slake pathvqa pneumoniamnist") picks and orders the evaluations.
set -euo pipefail
DATA_SRC=$(cd "$1" && pwd); WORK=$2; shift 2
STAGES=${*:-prepare train export eval}
MEDMOE=${MEDMOE:-medmoe}
RECIPE=${RECIPE:-nano}
EVAL_ARGS=${EVAL_ARGS:---batch-size 64 --max-new-tokens 32}
mkdir -p "$WORK" && cd "$WORK"

prepare() {
  $MEDMOE data prepare vqa-rad --src "$DATA_SRC/vqa-rad" --out data/vqa-rad
  $MEDMOE data prepare slake --src "$DATA_SRC/slake" --out data/slake
  $MEDMOE data prepare pathvqa --src "$DATA_SRC/pathvqa" --out data/pathvqa --holdout 0.1 --seed 0
  $MEDMOE data prepare medmnist --src "$DATA_SRC/pneumoniamnist/pneumoniamnist.npz" --out data/pneumoniamnist
}

evaluate() {  # evaluate MODEL_DIR OUT_DIR: the datasets of EVAL_DATASETS, in its order
  local model=$1 out=$2 ds split
  for ds in ${EVAL_DATASETS:-vqa-rad slake pathvqa pneumoniamnist}; do
    case $ds in pathvqa) split=heldout ;; pneumoniamnist) split=validation ;; *) split=test ;; esac
    $MEDMOE eval --model "$model" --data "data/$ds" --split "$split" --out "$out/$ds" $EVAL_ARGS
  done
}

ablation() {  # ablation NAME OVERRIDES...: phase 3 only, from the main run's phase 2 and router
  local name=$1; shift
  mkdir -p "runs/$name"
  ln -sfn "$PWD/runs/nano/phase2" "runs/$name/phase2"
  ln -sfn "$PWD/runs/nano/router" "runs/$name/router"
  $MEDMOE train --recipe "$RECIPE" --phase 3 --resume output_dir="runs/$name" "$@"
  evaluate "runs/$name/phase3/model" "evals/$name"
}

ablation_no-meta() { ablation no-meta phase3.moe.meta_expert=false phase3.moe.expert_type=full; }
ablation_plain-router() { ablation plain-router phase3.router_init=random phase3.train_router=true; }
ablation_per-sample() { ablation per-sample phase3.moe.routing=sample; }
ablation_full-experts() { ablation full-experts phase3.moe.expert_type=full; }
ablation_pooled() { ablation pooled phase3.moe.routing=pooled; }
ablation_per-layer-router() {  # routers trained on each MoE layer's real FFN inputs (its own router phase)
  mkdir -p runs/per-layer-router
  ln -sfn "$PWD/runs/nano/phase2" runs/per-layer-router/phase2
  $MEDMOE train --recipe "$RECIPE" --phase router --resume output_dir=runs/per-layer-router router.train_per_layer=true
  $MEDMOE train --recipe "$RECIPE" --phase 3 --resume output_dir=runs/per-layer-router phase3.moe.router_sharing=per_layer
  evaluate runs/per-layer-router/phase3/model evals/per-layer-router
}

ablation_per-layer-sample() {  # the per-layer routers above, each choosing one expert per sample
  mkdir -p runs/per-layer-sample
  ln -sfn "$PWD/runs/nano/phase2" runs/per-layer-sample/phase2
  ln -sfn "$PWD/runs/per-layer-router/router" runs/per-layer-sample/router
  $MEDMOE train --recipe "$RECIPE" --phase 3 --resume output_dir=runs/per-layer-sample phase3.moe.router_sharing=per_layer \
    phase3.moe.routing=sample
  evaluate runs/per-layer-sample/phase3/model evals/per-layer-sample
}

finetune_each() {  # per benchmark, from the exported model (the paper fine-tunes on each train split)
  local ds split
  for ds in vqa-rad:test slake:test pathvqa:heldout; do
    split=${ds#*:}; ds=${ds%%:*}
    $MEDMOE finetune --model export/nano --data "data/$ds" --out "runs/ft-$ds" --epochs "${FT_EPOCHS:-3}" \
      --batch-size 64 --resume
    $MEDMOE eval --model "runs/ft-$ds/model" --data "data/$ds" --split "$split" --out "evals/ft-$ds" $EVAL_ARGS
  done
}

for stage in $STAGES; do
  case $stage in
    prepare) prepare ;;
    train) $MEDMOE train --recipe "$RECIPE" --resume output_dir=runs/nano ${TRAIN_ARGS:-} ;;
    base) for phase in tower 1 2 router; do
            $MEDMOE train --recipe "$RECIPE" --phase $phase --resume output_dir=runs/nano ${TRAIN_ARGS:-}
          done ;;
    moe) $MEDMOE train --recipe "$RECIPE" --phase 3 --resume output_dir=runs/nano ${TRAIN_ARGS:-} ;;
    eval)
      evaluate runs/nano/phase2/model evals/dense
      evaluate export/nano evals/medmoe ;;
    eval-dense) evaluate runs/nano/phase2/model evals/dense ;;
    eval-medmoe) evaluate export/nano evals/medmoe ;;
    control) for ds in vqa-rad slake; do
               $MEDMOE eval --model export/nano --data "data/$ds" --split test --out "evals/medmoe-shuffled/$ds" \
                 --shuffle-images $EVAL_ARGS
             done ;;
    probe) for ds in vqa-rad slake; do
             mkdir -p evals/label-questions
             $MEDMOE data label-questions "data/$ds" --split test --out "evals/label-questions/$ds.jsonl"
             $MEDMOE eval --model export/nano --data "evals/label-questions/$ds.jsonl" --split test \
               --out "evals/medmoe-label-questions/$ds" $EVAL_ARGS --max-new-tokens 8
           done ;;
    finetune) finetune_each ;;
    export) $MEDMOE export runs/nano/phase3/model export/nano --base nano --dtype bfloat16 ;;
    ablations) for name in no-meta plain-router per-sample full-experts; do "ablation_$name"; done ;;
    no-meta|plain-router|per-sample|full-experts|per-layer-router|per-layer-sample|pooled) "ablation_$stage" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
