#!/usr/bin/env bash
# The GPU check in one call, from the repo root on the device machine (tools/README.md has the call):
#   bash tools/device_check.sh
# 1. card, driver, torch, CUDA, cuDNN versions      -> env.txt
# 2. python -m pytest -q tests/test_cuda.py            -> pytest.log
# 3. train_gpt2.py --benchmark per VARIANTS row        -> bench.log
# 4. karpathy/build-nanogpt, compiled, random tokens   -> anchor.log (needs .anchors/, see prepare_anchors.sh)
# 5. one HellaSwag eval on val-sized synthetic rows    -> hellaswag.log
# Every stage adds a row to results.jsonl and rewrites table.md, the summary, so it is there even if the
# call is cut off. Seven files in all, within what the device tool brings back (at most 8).
# A stage that would end past BUDGET_S seconds is skipped (its row says so), so the call ends in time.
#
# DRY=1 bash tools/device_check.sh runs every stage on the CPU with a tiny model (build-nanogpt is only
# patched and byte-compiled): it proves the plumbing, the parsing and the table, not the GPU.
set -uo pipefail

# Benchmark variants: name | train_gpt2.py flags | what changed. "A; B" in the flags: the first
# alternative whose flags `train_gpt2.py --help` all lists; with none, the row says skipped (the call goes
# on). Edit freely. The first row runs first, then build-nanogpt and the HellaSwag timing, then the other
# rows in order (when time is short, the last ones are skipped).
VARIANTS=(
  "compiled|--compile|this project's default: chunked loss, PyTorch's SDPA kernel choice, torch.compile"
  "muon|--compile --optimizer muon|Muon (bf16 Newton-Schulz each step) for the blocks' matrices, AdamW for the rest: the optimizer's cost per step"
  "fused-loss|--compile --loss-impl fused|chunked loss in the fusable formulation (no fp32 logits copy)"
  "cudnn-attention|--compile --loss-impl fused --sdpa-backend cudnn|fused loss + cuDNN attention preferred"
  "full-logits|--compile --loss-impl full|full (B, T, vocab) logits and F.cross_entropy, compiled"
  "eager|--no-compile|chunked loss, no torch.compile"
  "eager-full-logits|--no-compile --loss-impl full|full logits, no torch.compile (build-nanogpt as shipped)"
  "fsdp|--compile --fsdp|FSDP2 in a process group of one: bf16 compute weights, fp32 reduce; the cost of the sharding hooks"
  "recompute|--compile --recompute|activation recompute per Block: about 1/3 more compute, less peak memory"
  "fsdp-recompute-eager|--no-compile --fsdp --recompute|FSDP2 and recompute together, no torch.compile"
)
STEPS=${STEPS:-5}            # timed steps per benchmark, after train_gpt2.py's 3 warm-up steps
BUDGET_S=${BUDGET_S:-450}    # no stage starts that would end past this; none runs past BUDGET_S + 50
PY=${PYTHON:-python3}

cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/device_check.XXXX)}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)  # what need not come back
export PYTHONUNBUFFERED=1
[ -d .anchors/tiktoken-cache ] && export TIKTOKEN_CACHE_DIR=$PWD/.anchors/tiktoken-cache

if [ "${DRY:-0}" = 1 ]; then
  BASE_FLAGS="--model d2 -B 2 -T 64 --total-batch-size 256 --device cpu"
  HELLASWAG_ARGS="--model d2 --examples 200 --device cpu"
  HELLASWAG_WHAT="HellaSwag eval, 200 synthetic examples, d2, CPU"
  STAGE_TIMEOUT=900 COMPILED_S=0 EAGER_S=0 ANCHOR_S=0 HELLASWAG_S=0 BUDGET_S=100000
else
  BASE_FLAGS=""   # train_gpt2.py's defaults: gpt2 (124M), B=64, T=1024, 524,288 tokens per step, bf16
  HELLASWAG_ARGS=""
  HELLASWAG_WHAT="HellaSwag eval, 10,042 val-shaped synthetic examples, 124M, bf16 (ms/step: one eval)"
  # rough stage costs on an H200 (124M at about 1 s per step; torch.compile about a minute, less once
  # the inductor cache is warm), used only to skip a stage that would overrun BUDGET_S
  STAGE_TIMEOUT=240 COMPILED_S=70 EAGER_S=30 ANCHOR_S=80 HELLASWAG_S=40
fi
HARD_END_S=$((BUDGET_S + 30))

report() { "$PY" tools/device_report.py "$@"; }
render() { report render "$SCRATCH/env.json" "$OUT/results.jsonl" "$OUT/pytest.log" "$OUT/table.md"; }
trap 'render; rm -rf "$SCRATCH"' EXIT
rm -f "$OUT"/{results.jsonl,table.md,env.txt,pytest.log,bench.log,anchor.log,hellaswag.log}  # a rerun into the same OUT

# record KIND NAME WHAT STATUS [LOG]: one results row; table.md is rewritten after every stage, so it
# is there even if the call is cut off
record() {
  report add "$OUT/results.jsonl" "$@" >/dev/null
  render >/dev/null
}

# fits ESTIMATE_S: whether a stage of that cost still ends inside BUDGET_S
fits() { (( SECONDS + $1 <= BUDGET_S )); }

# run_logged LOG NAME COMMAND...: the command's output appended to LOG under a header, its time
# limited to STAGE_TIMEOUT and to what is left before HARD_END_S; sets STATUS (ok or why not)
run_logged() {
  local log=$1 name=$2 start=$SECONDS limit rc
  shift 2
  limit=$((HARD_END_S - SECONDS))
  (( limit > STAGE_TIMEOUT )) && limit=$STAGE_TIMEOUT
  (( limit < 10 )) && limit=10
  echo "== $name: $* (limit ${limit}s)" | tee -a "$log"
  timeout -k 20 "$limit" "$@" >>"$log" 2>&1  # -k: train_gpt2.py finishes its step on SIGTERM; KILL if that hangs
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
  case $rc in
    0) STATUS=ok ;;
    124) STATUS="failed: timed out after ${limit}s" ;;
    *) STATUS="failed: exit $rc" ;;
  esac
}

bench() {  # bench NAME "FLAGS[; FLAGS...]" WHAT
  local name=$1 what=$3 flags="" cost=$EAGER_S missing="" alternative
  local -a alternatives
  IFS=';' read -r -a alternatives <<<"$2"
  for alternative in "${alternatives[@]}"; do
    # shellcheck disable=SC2086  # flags are words on purpose
    missing=$(report missing-flags "$SCRATCH/help.txt" $alternative)
    if [ -z "$missing" ]; then flags=$alternative; break; fi
  done
  [[ " $flags " == *" --compile "* ]] && cost=$COMPILED_S
  if [ -n "$missing" ]; then
    record benchmark "$name" "$what" "skipped: train_gpt2.py has no $missing"
  elif ! fits "$cost"; then
    record benchmark "$name" "$what" "skipped: time budget"
  else
    # shellcheck disable=SC2086
    run_logged "$SCRATCH/$name.log" "$name" "$PY" train_gpt2.py --benchmark "$STEPS" $BASE_FLAGS $flags
    cat "$SCRATCH/$name.log" >>"$OUT/bench.log"
    record benchmark "$name" "$what" "$STATUS" "$SCRATCH/$name.log"
  fi
}

anchor() {
  local what
  what="karpathy/build-nanogpt train_gpt2.py $(cat .anchors/build-nanogpt/COMMIT 2>/dev/null), torch.compile on, random tokens"
  if [ ! -f .anchors/build-nanogpt/train_gpt2.py ]; then
    record anchor build-nanogpt "$what" "skipped: no .anchors/ (run prepare_anchors.sh; carry .anchors)"
  elif ! fits "$ANCHOR_S"; then
    record anchor build-nanogpt "$what" "skipped: time budget"
  elif [ "${DRY:-0}" = 1 ]; then
    run_logged "$OUT/anchor.log" build-nanogpt "$PY" tools/nanogpt_anchor.py --run-dir "$SCRATCH/nanogpt" --dry
    [ "$STATUS" = ok ] && STATUS="dry: patched and byte-compiled, not run"
    record anchor build-nanogpt "$what" "$STATUS"
  else
    run_logged "$OUT/anchor.log" build-nanogpt \
      "$PY" tools/nanogpt_anchor.py --steps $((STEPS + 3)) --run-dir "$SCRATCH/nanogpt"
    record anchor build-nanogpt "$what" "$STATUS" "$OUT/anchor.log"
  fi
}

hellaswag_timing() {
  if ! fits "$HELLASWAG_S"; then
    record hellaswag hellaswag-eval "$HELLASWAG_WHAT" "skipped: time budget"
    return
  fi
  # shellcheck disable=SC2086
  run_logged "$OUT/hellaswag.log" hellaswag "$PY" tools/hellaswag_timing.py $HELLASWAG_ARGS
  record hellaswag hellaswag-eval "$HELLASWAG_WHAT" "$STATUS" "$OUT/hellaswag.log"
}

echo "== environment" | tee "$OUT/env.txt"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
  report env "$SCRATCH/env.json"; } | tee -a "$OUT/env.txt"

run_logged "$OUT/pytest.log" tests "$PY" -m pytest -q tests/test_cuda.py -rfEs
echo "== tests: $(report pytest-summary "$OUT/pytest.log")"

"$PY" train_gpt2.py --help >"$SCRATCH/help.txt" 2>&1
IFS='|' read -r name flags what <<<"${VARIANTS[0]}"
bench "$name" "$flags" "$what"
anchor
hellaswag_timing
for variant in "${VARIANTS[@]:1}"; do
  IFS='|' read -r name flags what <<<"$variant"
  bench "$name" "$flags" "$what"
done
echo "== done after ${SECONDS}s; files in $OUT"
