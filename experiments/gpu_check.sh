#!/bin/bash
# Issue 10's accelerator checks, in one call of a lent GPU machine (which reaches no package index):
#   precision  the sampler's precision there (experiments/gpu_precision.py): float32, TF32, and float32 with
#              bf16 convolutions in both networks ($PRECISION_MODES);
#   warm       every row's programs of ours compiled at once, in parallel processes, into a persistent XLA
#              cache (JAX_COMPILATION_CACHE_DIR), while `precision` runs: the benchmark stages below then
#              load them instead of compiling one after another (~40 s a row on an H100). The compile
#              times these processes print (contended, so upper bounds) go to warm.txt; the benchmark
#              tables' "compile s" are then cache loads;
#   benchmark  experiments/benchmark.py there, ours (float32) beside the reference run on the same GPU
#              (experiments/refbench_gpu.py), rows $ROWS;
#   bf16       ours again with bf16 convolutions in both networks (--conv_dtype=bfloat16), rows $BF16_ROWS;
#   extra      more float32 rows of ours without the reference, $EXTRA_ROWS (not by default);
#   memory     CelebA-HQ 256's stage-2 step memory as XLA:GPU compiles it, remat on and off (not by default).
# Everything the machine lacks travels in $CARRY (ignored by git, named in the call's `carry`):
#   $CARRY/whl/*.whl            ml_collections and clu (pure-Python wheels; jax, flax, optax, torch are there)
#   $CARRY/refbench/{refbench.py,VAEBM,NVAE}   ../shared/refbench/refbench.py and the reference's sources
#   $CARRY/shared/reference/    ../shared/reference (the golden file), if ../shared is not beside the checkout
# Results land in $OUT (at most 8 files come back): env.txt, precision.json, warm.txt, benchmark.json,
# benchmark_bf16.json, logs.txt. Each stage has its own time limit, and a stage that fails does not stop the
# next. Environment: OUT, CARRY (.devcarry), PY (python3), ROWS, BF16_ROWS, PRECISION_MODES, PRECISION_S (200),
# WARM_S (240), BENCH_S (230), BF16_S (130), MEMORY_S (240 each), REF_DEVICE (cuda),
# STAGES ('precision warm benchmark bf16').
#
# Planning a lease (H100, 2026-11-27): a machine starts in ~35 s; precision takes ~110 s for three modes;
# in `warm`, with eight compiles at once, a Langevin or NVAE row compiled in 67-108 s but the CIFAR-10 EBM
# rows took over 180 s; a worker of ours whose programs are cached still takes ~50 s of wall (start, JAX,
# random weights for the 130 M-parameter NVAE, tracing, timed steps); a reference row 15-28 s. So one
# 15-minute lease holds `precision warm benchmark bf16` for about three rows each, with WARM_S=300.
# Still to measure (RESULTS.md): ebm_c10_b4 ours beside the reference in one call, bf16 for ebm/nvae rows,
# and precision.json's "compiled convs with bf16 operands" (does XLA:GPU convolve in bf16 forward?).
# The next lease, one call of ~9 minutes (precision ~80 s beside a 4-compile warm stage, then two rows
# with the reference, ~150 s, and the same two in bf16, ~100 s), with `carry` [".devcarry"], timeout_s 600:
#   STAGES="precision warm benchmark bf16" PRECISION_MODES=float32,bf16_networks ROWS=ebm_c10_b4,nvae_c10_b4 \
#     BF16_ROWS=ebm_c10_b4,nvae_c10_b4 PRECISION_S=120 WARM_S=240 BENCH_S=200 BF16_S=120 \
#     bash experiments/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
CARRY=${CARRY:-.devcarry}
PY=${PY:-python3}
ROWS=${ROWS:-lg_c10_b16,ebm_c10_b4,nvae_c10_b4,lg_c10_b1,ebm_cel_b4}
BF16_ROWS=${BF16_ROWS:-lg_c10_b16,ebm_c10_b4,nvae_c10_b4,lg_c10_b1}
PRECISION_MODES=${PRECISION_MODES:-float32,tensorfloat32,bf16_networks}
STAGES=${STAGES:-precision warm benchmark bf16}
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/vaebm_gpu_xla_cache}
LOGS=/tmp/gpu_check_logs
mkdir -p "$OUT" "$LOGS"
if ls "$CARRY"/whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
[ -e ../shared/reference ] || { mkdir -p ../shared && cp -r "$CARRY/shared/reference" ../shared/; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; lscpu | grep "Model name";
  $PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" 2>&1; } | tee "$OUT/env.txt"
has() { [[ " $STAGES " == *" $1 "* ]]; }
collect() { for f in "$LOGS"/*.log; do echo "##### $f"; tail -n 40 "$f"; done > "$OUT/logs.txt" 2>&1; }

warm_pids=()
if has warm; then
  echo "=== warm $(date -u +%T)"   # parallel compiles: no preallocation, so that they share the GPU's memory
  for dtype in float32 bfloat16; do
    rows=$ROWS,${EXTRA_ROWS:-}; [ "$dtype" = bfloat16 ] && rows=$BF16_ROWS
    for row in ${rows//,/ }; do
      XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${WARM_S:-240}" $PY experiments/benchmark.py --worker="$row" \
        --repeats=1 --conv_dtype="$dtype" > "$LOGS/warm_${row}_${dtype}.log" 2>&1 &
      warm_pids+=($!)
    done
  done
fi

if has precision; then
  echo "=== precision $(date -u +%T)"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${PRECISION_S:-200}" $PY experiments/gpu_precision.py \
    --modes="$PRECISION_MODES" --out="$OUT/precision.json" > "$LOGS/precision.log" 2>&1
  echo "precision exit $?"
  grep -A8 "^Device:" "$LOGS/precision.log" || tail -n 15 "$LOGS/precision.log"
fi

if has warm; then
  for pid in "${warm_pids[@]}"; do wait "$pid"; done
  echo "=== warm done $(date -u +%T)"
  for f in "$LOGS"/warm_*.log; do
    echo "$(basename "$f" .log): $(grep -o '"compile_s": [0-9.]*' "$f" | head -1) $(grep -o '"s_per_step": [0-9.]*' "$f" | head -1) $(grep -m1 -E 'Error|error' "$f" | cut -c1-200)"
  done | tee "$OUT/warm.txt"
  collect
fi

if has memory; then
  echo "=== memory"     # CelebA-HQ 256's stage-2 step compiled by XLA:GPU, with and without remat of the NVAE's cells
  for remat in --remat --noremat; do
    timeout "${MEMORY_S:-240}" $PY experiments/memory_stage2.py --config=celebahq256 $remat > "$LOGS/memory$remat.log" 2>&1
    echo "memory $remat exit $?"; grep "^RESULT" "$LOGS/memory$remat.log" | cut -c1-600
  done
  collect
fi

if has benchmark; then
  echo "=== benchmark $(date -u +%T)"
  export REFBENCH=$PWD/$CARRY/refbench REFBENCH_TMP=/tmp/refbench_out
  timeout "${BENCH_S:-230}" $PY experiments/benchmark.py --rows="$ROWS" --reference_python="$PY" \
    --refbench="$CARRY/refbench/refbench.py" --reference_device="${REF_DEVICE:-cuda}" --noflops \
    --out="$OUT/benchmark.json" > "$LOGS/benchmark.log" 2>&1
  echo "benchmark exit $?"
  grep -E "^===|failed|Error" "$LOGS/benchmark.log" | cut -c1-300
  [ -e "$OUT/benchmark.json" ] && $PY experiments/benchmark.py --table="$OUT/benchmark.json"
  collect
fi

if has bf16; then
  echo "=== bf16 $(date -u +%T)"
  timeout "${BF16_S:-130}" $PY experiments/benchmark.py --rows="$BF16_ROWS" --noreference --conv_dtype=bfloat16 \
    --noflops --out="$OUT/benchmark_bf16.json" > "$LOGS/bf16.log" 2>&1
  echo "bf16 exit $?"
  grep -E "^===|failed|Error" "$LOGS/bf16.log" | cut -c1-300
  [ -e "$OUT/benchmark_bf16.json" ] && $PY experiments/benchmark.py --table="$OUT/benchmark_bf16.json"
  collect
fi
if has extra; then     # more float32 rows of ours, without the reference (EXTRA_ROWS; not by default)
  echo "=== extra $(date -u +%T)"
  timeout "${EXTRA_S:-120}" $PY experiments/benchmark.py --rows="$EXTRA_ROWS" --noreference --noflops \
    --out="$OUT/benchmark_extra.json" > "$LOGS/extra.log" 2>&1
  echo "extra exit $?"
  [ -e "$OUT/benchmark_extra.json" ] && $PY experiments/benchmark.py --table="$OUT/benchmark_extra.json"
  collect
fi
echo "=== done $(date -u +%T)"
