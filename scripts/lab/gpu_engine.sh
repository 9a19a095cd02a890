#!/usr/bin/env bash
# On the GPU machine: the engine's GPU tests and the measurements behind docs/speed.md's serving
# and evaluation rows, in back-to-back calls (the nano base weights travel as the payload of
# scripts/lab/gpu_payload.sh, one part per call: the checkout and what a call carries stay under 64 MiB):
#
#   bash scripts/lab/gpu_engine.sh part1    # carrying .gpu/payload.partaa: stage it; GPU tests; decode bench
#   bash scripts/lab/gpu_engine.sh serve    # carrying the next part and .gpu/srv: stage it; serve bench (Phi-2 size, 1 and 32 clients)
#   bash scripts/lab/gpu_engine.sh stage    # carrying the next part, as often as parts are left but one
#                                           # (serve_compile in its place: the serve bench with --compile)
#   bash scripts/lab/gpu_engine.sh part2    # carrying the last part, .gpu/payload.sha256, .gpu/whl: eval of nano
#   bash scripts/lab/gpu_engine.sh evals [ARGS...]  # carrying the last part, .gpu/payload.sha256, .gpu/whl: eval of
#                                           # nano once per ARGS (extra eval options, "-" for none), engine statistics
#   bash scripts/lab/gpu_engine.sh serves "1,32" "1,32 --no-compile"  # carrying .gpu/srv: the serve bench per serve-args
#   bash scripts/lab/gpu_engine.sh prefill_check  # carrying .gpu/srv: the GPU tests and the serve bench (< 8 min: the server compiles)
#   bash scripts/lab/gpu_engine.sh prefill_profile  # carrying .gpu/srv: where 32 image prompts' prefill time goes, staged and the
#                                           # model's own forward (scripts/profile_speed.py prefill; < 3 min)
#   bash scripts/lab/gpu_engine.sh serve_profile  # 32 lock-step clients on the serve engine, profiled, and the trace's timeline
#   bash scripts/lab/gpu_engine.sh train_speed    # nano's phase-2 training step, eager and compile=true (scripts/lab/train_speed.py)
#   bash scripts/lab/gpu_engine.sh attention      # decode and prefill attention kernels at the 32-client load's shapes
#                                           # (scripts/lab/attention_bench.py; about a minute, nothing carried)
#   bash scripts/lab/gpu_engine.sh overlap        # a prefill forward beside decode steps on two streams, against one
#                                           # after the other (scripts/lab/overlap_bench.py; about two minutes)
#   bash scripts/lab/gpu_engine.sh eval_profile  # carrying the last part, .gpu/payload.sha256, .gpu/whl (PAYLOAD_DIR=.gpu/eval):
#                                           # where nano's evaluation of VQA-RAD spends its time (profile_speed.py eval)
#   bash scripts/lab/gpu_engine.sh prefill_ab     # the same, with and without prefill graphs, and --compile (< 10 min)
#   CODE=$PWD/.gpu/old ...                  # any of them with another checkout's medmoe package (an A/B on one
#                                           # machine: git archive REV medmoe | tar -x -C .gpu/old, carry .gpu/old)
#   PAYLOAD_DIR=.gpu/eval ...               # the four-part payload of scripts/lab/gpu_eval_payload.sh for `stage`
#                                           # and `evals` (nano and VQA-RAD only), e.g. the last call:
#                                           # evals "--batch-size 128" "--batch-size 128 --no-prefill-graphs"
#   bash scripts/lab/gpu_engine.sh profile  # carrying .gpu/srv: where the time goes, in one call (< 8 min): the
#                                           # warm-up's GPU test, the serve bench and, where part2 staged the payload,
#                                           # the eval of nano, each with its engine's statistics
#                                           # (GET /v1/engine/stats, metrics.json run.engine)
# Everything it prints goes to $OUT/log.txt too; results are JSON files in $OUT.
set -uo pipefail
STAGE=${STAGE:-/root/stage}; OUT=${OUT:?set OUT to the folder that comes back}
export PYTHONUNBUFFERED=1 PYTHONPATH="$STAGE/site:${CODE:-$PWD}" MEDMOE_CACHE="$STAGE/cache"  # CODE: another checkout's package (an A/B)
M="python3 -m medmoe"
[ -n "${CODE:-}" ] && M="env -C $CODE python3 -m medmoe"  # run from there: python -m puts the working folder first
exec > >(tee -a "$OUT/log.txt") 2>&1
step() { echo "== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

stage() {  # the payload parts this call carries (PAYLOAD_DIR=.gpu/eval: scripts/lab/gpu_eval_payload.sh's)
  mkdir -p "$STAGE" && cp "${PAYLOAD_DIR:-.gpu}"/payload.part?? "$STAGE/" && ls "$STAGE"
}

part1() {
  stage
  step "GPU tests"
  timeout 240 python3 -m pytest -q tests/test_engine_gpu.py tests/test_decode_attention.py \
    tests/test_overlap.py tests/test_fused_layers.py tests/test_prepare.py tests/test_kernels.py tests/test_engine_compile.py 2>&1 | tail -8
  step "decode bench (the engine)"
  timeout 240 $M bench --what decode --decode-batches 1,8,32 --new-tokens 128 --out "$OUT/decode.json" 2>&1 | grep -v "^ *[0-9]*%|"
}

serve_packages() {  # the GPU image has no fastapi: carry .gpu/srv (scripts/lab/gpu_payload.sh fills it)
  python3 -c "import fastapi, uvicorn" 2>/dev/null && return
  python3 -m pip install -q --no-deps --target "$STAGE/site" .gpu/srv/*.whl || exit 6
}

serve() {
  stage; serve_packages
  step "serve bench: Phi-2-size random Med-MoE through medmoe serve, 128-token answers"
  timeout 480 $M bench --what serve --model phi2 --clients 1,32 --max-tokens 128 --image --out /tmp/serve 2>&1 | tail -12
  cp /tmp/serve/serve.json /tmp/serve/serve.png "$OUT/" 2>/dev/null
}

serve_compile() {  # the same with the decode step compiled at start-up (medmoe serve --compile)
  stage; serve_packages
  step "serve bench with --compile"
  timeout 540 $M bench --what serve --model phi2 --clients 1,32 --max-tokens 128 --image --serve-args=--compile \
    --out /tmp/serve-compile 2>&1 | tail -12
  cp /tmp/serve-compile/serve.json "$OUT/serve-compile.json" 2>/dev/null
  cp /tmp/serve-compile/serve.png "$OUT/serve-compile.png" 2>/dev/null
}

serves() {  # carrying .gpu/srv: the serve bench (Phi-2 size, image prompts, 128-token answers) once per argument:
            # "CLIENTS SERVE-ARGS..." (e.g. "1,32" "1,32 --compile" "32 --prefill-chunk 8192"), each in a fresh server
  serve_packages
  local k=0 spec clients args
  for spec in "$@"; do
    k=$((k + 1)); clients=${spec%% *}; args=""; [ "$spec" != "$clients" ] && args=${spec#* }
    step "serve $k: clients $clients, serve args '$args'"
    timeout 420 $M bench --what serve --model phi2 --clients "$clients" --max-tokens 128 --image \
      ${args:+"--serve-args=$args"} --out /tmp/serve-$k 2>&1 | grep -v "^ *[0-9]*%|" | tail -8
    cp /tmp/serve-$k/serve.json "$OUT/serve-$k.json" 2>/dev/null
    echo "server start (warm-up): $(engine_line /tmp/serve-$k/serve.json engine_at_start)"
    grep -i "warn\|error\|fallback" /tmp/serve-$k/serve-server.log 2>/dev/null | tail -3
  done
}

engine_line() {  # the engine's summary line of a bench or eval JSON: engine_line FILE KEY...
  python3 - "$@" <<'PY'
import json, sys
from medmoe.engine.stats import summary_line
record = json.load(open(sys.argv[1]))
for key in sys.argv[2:]:
    record = record.get(key) or {}
print(summary_line(record.get("stats", record)) if record else "no engine statistics")
PY
}

profile() {
  serve_packages
  step "profile: no request captures a graph or grows the cache after warm-up (GPU test)"
  timeout 60 python3 -m pytest -q tests/test_engine_gpu.py -k after_warmup 2>&1 | tail -3
  step "profile: serve bench, Phi-2-size random Med-MoE, 1 and 32 clients, 128-token answers with an image"
  timeout 480 $M bench --what serve --model phi2 --clients 1,32 --max-tokens 128 --image --out /tmp/profile-serve 2>&1 \
    | grep -v "^ *[0-9]*%|"
  cp /tmp/profile-serve/serve.json "$OUT/profile-serve.json" 2>/dev/null
  echo "server start (warm-up): $(engine_line /tmp/profile-serve/serve.json engine_at_start)"
  grep -i "warn\|error" /tmp/profile-serve/serve-server.log | tail -5
  if [ ! -f "$STAGE/ready" ]; then
    echo "no payload staged in $STAGE (part2 stages it): the eval is skipped"
    return
  fi
  step "profile: eval of nano on VQA-RAD test, --max-new-tokens 32"
  $M data prepare vqa-rad --src "$STAGE/data/vqa-rad" --out /tmp/data/vqa-rad > /dev/null 2>&1
  rm -rf /tmp/profile-eval  # a rerun on a warm machine would resume, not measure
  timeout 150 $M eval --data /tmp/data/vqa-rad --split test --max-new-tokens 32 --out /tmp/profile-eval 2>&1 \
    | grep -v "it/s\]\|q/s\]" | tail -4
  cp /tmp/profile-eval/metrics.json "$OUT/profile-eval.json" 2>/dev/null
  python3 -c "import json; r = json.load(open('/tmp/profile-eval/metrics.json'))['run']; print('eval:', r['this_call'], r['dtype'], r['device'])"
}

prefill_ab() {  # carrying .gpu/srv (and a payload part, staged): the GPU tests of the engine, then the serve bench with prefill graphs (the
                # default), without them (--no-prefill-graphs), and one client with --compile, in one call (< 10 min)
  ls "${PAYLOAD_DIR:-.gpu}"/payload.part?? >/dev/null 2>&1 && stage
  serve_packages
  step "GPU tests: engine, prefill graphs"
  timeout 150 python3 -m pytest -q tests/test_engine_gpu.py tests/test_prefill_step.py 2>&1 | grep -E "passed|failed|Error|^E " | head -12
  local name extra
  for name in graphs eager; do
    extra="--serve-args=--no-compile"; [ $name = eager ] && extra="--serve-args=--no-compile --no-prefill-graphs"
    step "serve bench ($name prefill): Phi-2-size random Med-MoE, 1 and 32 clients, 128-token answers with an image"
    timeout 200 $M bench --what serve --model phi2 --clients 1,32 --max-tokens 128 --image "$extra" --out /tmp/serve-$name 2>&1 \
      | grep -v "^ *[0-9]*%|" | tail -6
    cp /tmp/serve-$name/serve.json "$OUT/serve-$name.json" 2>/dev/null
    echo "server start (warm-up): $(engine_line /tmp/serve-$name/serve.json engine_at_start)"
  done
  step "serve bench with --compile, 1 client"
  timeout 170 $M bench --what serve --model phi2 --clients 1 --max-tokens 128 --image --serve-args=--compile \
    --out /tmp/serve-compile 2>&1 | grep -v "^ *[0-9]*%|" | tail -5
  cp /tmp/serve-compile/serve.json "$OUT/serve-compile.json" 2>/dev/null
  grep -i "compile\|warn" /tmp/serve-compile/serve-server.log 2>/dev/null | tail -4
}

prefill_check() {  # carrying .gpu/srv: the engine's GPU tests, then the serve bench with prefill graphs (< 5 min)
  serve_packages
  step "GPU tests: engine, prefill graphs"
  timeout 100 python3 -m pytest -q tests/test_engine_gpu.py tests/test_prefill_step.py 2>&1 | grep -E "passed|failed|Error|^E " | head -12
  step "serve bench (graphs prefill): Phi-2-size random Med-MoE, 1 and 32 clients, 128-token answers with an image"
  timeout 480 $M bench --what serve --model phi2 --clients 1,32 --max-tokens 128 --image --out /tmp/serve-graphs 2>&1 \
    | grep -v "^ *[0-9]*%|" | tail -6
  cp /tmp/serve-graphs/serve.json "$OUT/serve-graphs.json" 2>/dev/null
  echo "server start (warm-up): $(engine_line /tmp/serve-graphs/serve.json engine_at_start)"
  grep -i "warm-up\|warn" /tmp/serve-graphs/serve-server.log 2>/dev/null | tail -4
}

prefill_profile() {  # wall time against kernel time of the prefill forwards of 32 image prompts, both paths
  serve_packages  # the profile builds its engine as medmoe serve does (serving.server's limits)
  local path
  for path in 32 32,eager; do
    step "prefill profile: $path"
    PROFILE_TRACE="$OUT/prefill-trace-${path/,/-}.json.gz" timeout 150 python3 scripts/profile_speed.py prefill=$path \
      > "$OUT/prefill-profile-$path.txt" 2>&1
    grep -A 34 "^====" "$OUT/prefill-profile-$path.txt" | cut -c1-200
  done
}

attention() {  # the engine's decode and prefill attention against FlexAttention and varlen_attn (checked, then timed)
  step "attention kernels: Phi-2 shapes, decode at batch 1/8/32, prefill of 1 and 3 image prompts"
  timeout 300 python3 scripts/lab/attention_bench.py --out "$OUT/attention.json" 2>&1 | grep -v "^ *warnings.warn\|UserWarning"
}

overlap() {  # a prefill forward beside decode steps on two CUDA streams, against one after the other
  step "overlap: Phi-2 size, 32 rows decoding beside a prefill of 3 image prompts, from CUDA graphs"
  # Each graph owner records on a stream of its own (engine/graph_capture.py; lab runs W and X): the tiny
  # model's GPU test first, then the bench, then the bench with the routed experts on the main stream.
  timeout 120 python3 -m pytest -q tests/test_engine_gpu.py -k two_streams 2>&1 | tail -3
  local extra
  for extra in "" --no-overlap-experts; do
    timeout 100 python3 scripts/lab/overlap_bench.py --stack-after 40 $extra --out "$OUT/overlap${extra}.json" 2>&1 \
      | grep --line-buffered -v "^ *warnings.warn\|UserWarning"  # line by line: a run cut short shows how far it got
  done
}

train_speed() {  # nano's phase-2 step through medmoe train's loop, eager against compile=true (random
                 # weights: nothing carried; < 6 min)
  step "train speed: nano phase 2 (random weights), batch 64, eager and compile=true"
  timeout 480 python3 scripts/lab/train_speed.py --steps 40 --out "$OUT/train-speed.json" 2>&1 | grep -v "it/s\]"
}

serve_profile() {  # where 32 lock-step clients' time goes on the serve engine (profile_speed.py serve=32; < 4 min)
  serve_packages  # the profile builds its engine as medmoe serve does (serving.server's limits)
  step "serve profile: 32 clients x 4 requests, Phi-2-size random Med-MoE, 128-token answers with an image"
  PROFILE_TRACE="$OUT/serve-trace.json.gz" timeout 300 python3 scripts/profile_speed.py serve=32 > "$OUT/serve-profile.txt" 2>&1
  grep -A 12 "^====" "$OUT/serve-profile.txt" | cut -c1-400
  python3 scripts/lab/trace_timeline.py "$OUT/serve-trace.json.gz" | head -40
}

eval_profile() {  # the engine's parts in nano's evaluation of VQA-RAD test, host and device time
  if [ ! -f "$STAGE/ready" ]; then
    stage && bash scripts/lab/gpu_run.sh || exit $?
  fi
  $M data prepare vqa-rad --src "$STAGE/data/vqa-rad" --out /tmp/data/vqa-rad > /dev/null 2>&1
  step "eval profile: nano on VQA-RAD test, batch 128, 32 new tokens"
  PROFILE_TRACE="$OUT/eval-trace.json.gz" timeout 240 python3 scripts/profile_speed.py eval=/tmp/data/vqa-rad \
    > "$OUT/eval-profile.txt" 2>&1
  grep -A 45 "^====" "$OUT/eval-profile.txt" | cut -c1-200
}

evals() {  # carrying the last part, .gpu/payload.sha256, .gpu/whl: eval of nano on VQA-RAD test, once per
           # argument (extra eval options, "-" for none; default: "-" "--admit-batch 1" "-"), each with its statistics
  if [ ! -f "$STAGE/ready" ]; then
    stage && bash scripts/lab/gpu_run.sh || exit $?
  fi
  $M data prepare vqa-rad --src "$STAGE/data/vqa-rad" --out /tmp/data/vqa-rad > /dev/null 2>&1
  [ $# -gt 0 ] || set -- - "--admit-batch 1" -
  local k=0 extra
  for extra in "$@"; do
    [ "$extra" = - ] && extra=""
    k=$((k + 1))
    step "eval $k: nano on VQA-RAD test, --max-new-tokens 32 $extra"
    rm -rf /tmp/eval-run  # a rerun would resume, not measure
    timeout 150 $M eval --data /tmp/data/vqa-rad --split test --max-new-tokens 32 --out /tmp/eval-run $extra 2>&1 \
      | grep -E "^engine|bootstrap" | cut -c1-900
    python3 -c "import json; r = json.load(open('/tmp/eval-run/metrics.json'))['run']; print('eval:', r['this_call'], r['dtype'], r['device'])"
    cp /tmp/eval-run/metrics.json "$OUT/eval-$k.json" 2>/dev/null
  done
}

part2() {
  if [ ! -f "$STAGE/ready" ]; then
    stage && bash scripts/lab/gpu_run.sh || exit $?  # assembles the payload (no stages run)
  fi
  step "eval: the bundled model on VQA-RAD test, --max-new-tokens 32"
  $M data prepare vqa-rad --src "$STAGE/data/vqa-rad" --out /tmp/data/vqa-rad > /dev/null 2>&1
  $M data prepare medmnist --src "$STAGE/data/pneumoniamnist/pneumoniamnist.npz" --out /tmp/data/pneumoniamnist > /dev/null 2>&1
  timeout 150 $M eval --data /tmp/data/vqa-rad --split test --max-new-tokens 32 --out /tmp/eval-vqa-rad 2>&1 | grep -v "it/s\]\|q/s\]"
  cp /tmp/eval-vqa-rad/metrics.json "$OUT/eval-vqa-rad.json"
  step "eval: the bundled model on PneumoniaMNIST validation (calibration)"
  timeout 120 $M eval --data /tmp/data/pneumoniamnist --split validation --out /tmp/eval-pn 2>&1 | grep -v "it/s\]\|q/s\]"
  cp /tmp/eval-pn/metrics.json "$OUT/eval-pneumoniamnist.json"
  cp /tmp/eval-vqa-rad/calibration_closed.png "$OUT/" 2>/dev/null
}

"$@"
