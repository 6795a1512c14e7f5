#!/bin/bash
# Issue 10's accelerator checks, in one call of a lent GPU machine (which reaches no package index):
#   1. float32 precision of the sampler there (experiments/gpu_precision.py),
#   2. (STAGES=memory) CelebA-HQ 256's stage-2 step memory as XLA:GPU compiles it, remat on and off,
#   3. experiments/benchmark.py there, ours beside the reference run on the same GPU
#      (experiments/refbench_gpu.py).
# Everything the machine lacks travels in $CARRY (ignored by git, named in the call's `carry`):
#   $CARRY/whl/*.whl            ml_collections and clu (pure-Python wheels; jax, flax, optax, torch are there)
#   $CARRY/refbench/{refbench.py,VAEBM,NVAE}   ../shared/refbench/refbench.py and the reference's sources
#   $CARRY/shared/reference/    ../shared/reference (the golden file), if ../shared is not beside the checkout
# Results land in $OUT (precision.json, benchmark.json, logs). Each stage has its own time limit, and a
# stage that fails does not stop the next. Environment: OUT, CARRY (.devcarry), PY (python3), ROWS,
# PRECISION_S (150), MEMORY_S (240 each), BENCH_S (380), REF_DEVICE (cuda), STAGES ('precision benchmark';
# the next lease: 'precision memory benchmark').
set -u
OUT=${OUT:-/tmp/gpu_check}
CARRY=${CARRY:-.devcarry}
PY=${PY:-python3}
ROWS=${ROWS:-lg_c10_b16,ebm_c10_b4,nvae_c10_b4,lg_c10_b4,lg_cel_b4,ebm_cel_b4,lg_c10_b1}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ls "$CARRY"/whl/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
[ -e ../shared/reference ] || { mkdir -p ../shared && cp -r "$CARRY/shared/reference" ../shared/; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; lscpu | grep "Model name";
  $PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())" 2>&1; } | tee "$OUT/env.txt"

STAGES=${STAGES:-precision benchmark}
if [[ " $STAGES " == *" precision "* ]]; then
echo "=== precision"
timeout "${PRECISION_S:-150}" $PY experiments/gpu_precision.py --out="$OUT/precision.json" > "$OUT/precision.log" 2>&1
echo "precision exit $?"
grep -A8 "^Device:" "$OUT/precision.log" || tail -n 15 "$OUT/precision.log"
fi

if [[ " $STAGES " == *" memory "* ]]; then
echo "=== memory"     # CelebA-HQ 256's stage-2 step compiled by XLA:GPU, with and without remat of the NVAE's cells
for remat in --remat --noremat; do
  timeout "${MEMORY_S:-240}" $PY experiments/memory_stage2.py --config=celebahq256 $remat > "$OUT/memory$remat.log" 2>&1
  echo "memory $remat exit $?"; grep "^RESULT" "$OUT/memory$remat.log" | cut -c1-600
done
fi

[[ " $STAGES " == *" benchmark "* ]] || exit 0
echo "=== benchmark"
export REFBENCH=$PWD/$CARRY/refbench REFBENCH_TMP=/tmp/refbench_out
timeout "${BENCH_S:-380}" $PY experiments/benchmark.py --rows="$ROWS" --reference_python="$PY" \
  --refbench="$CARRY/refbench/refbench.py" --reference_device="${REF_DEVICE:-cuda}" --noflops \
  --out="$OUT/benchmark.json" > "$OUT/benchmark.log" 2>&1
echo "benchmark exit $?"
grep -E "^===|failed|Error" "$OUT/benchmark.log" | cut -c1-300
[ -e "$OUT/benchmark.json" ] && $PY experiments/benchmark.py --table="$OUT/benchmark.json"
