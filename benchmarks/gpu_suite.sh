#!/usr/bin/env bash
# One-shot GPU suite for an H100/H200 (see benchmarks/README.md, "GPU suite"). Runs from the checkout with
# PYTHONPATH=. (nothing needs to be pip-installed) on a synthetic corpus, and writes its tables
# under $OUT (default ./gpu_out). Budget: each stage has its own timeout (90 + 190 + 60 + 40 + 200 s,
# at most 9.7 minutes together); a stage that times out leaves the others' tables.
#
# --rehearse: the same stages on a CPU, to meet on a laptop any error the GPU run could meet:
# verify, every attention path at tiny shapes (interpreted, untimed; a dry run has no shapes of its
# own, so the second attention command, which differs in shapes only, is skipped), one step of
# each train-step variant at a tiny batch, and each variant's train step compiled for an H200 by
# the plan tool (needs the `plan` extra). Timeouts are 6x the GPU's.
set -uo pipefail
REHEARSE=0
[ "${1:-}" = "--rehearse" ] && REHEARSE=1
limit() { echo $(( $1 * (REHEARSE ? 6 : 1) )); }
DRY=$([ $REHEARSE = 1 ] && echo --dry-run)
TINY_STEP=$([ $REHEARSE = 1 ] && echo "--steps 1 --loop-steps 0 --set data.seq_len=64 --set training.batch_size=2")
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export OUT=${OUT:-gpu_out}  # the suite writes 10 files there
mkdir -p "$OUT"
STAMP=$(date -u +%Y-%m-%d)
status=0

{
  echo "# genesis-jax GPU suite, $STAMP"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__); print(jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

echo "== correctness: model forward/backward per attention backend vs reference (python -m genesis_jax.verify)"
timeout "$(limit 90)" python -m genesis_jax.verify --out "$OUT/verify.csv" 2>&1 | tee "$OUT/verify.txt" || status=1

echo "== attention kernels: ours (pallas: Triton, mosaic: Mosaic GPU), the jnp reference, cudnn vs jax.nn XLA, bundled mha, PyTorch SDPA (bf16)"
# Model shapes (with and without GQA) and the FlashAttention grid's causal hd128 row, then the
# headline shape non-causal and at hd64 (seq 2048). The blocked `xla` backend is a CPU path: not timed.
B=pallas,mosaic,reference,cudnn,jax_xla,jax_mha
timeout "$(limit 190)" bash -c "python benchmarks/attention.py --backends $B --shapes model,paper --seqs 512,2048,8192 \
  --head-dims 128 --causal true --iters 20 --out $OUT $DRY \
  && { [ $REHEARSE = 1 ] || python benchmarks/attention.py --backends $B --shapes paper --seqs 2048 --head-dims 64,128 \
  --causal false --iters 20 --out $OUT/noncausal; }" 2>&1 | tee "$OUT/attention.txt" || status=1

echo "== Mosaic kernel variants (kernels/README.md): defaults vs one compute warpgroup (everywhere, in the backward),"
echo "   no ping-pong, P and dS via shared memory"
timeout "$(limit 60)" python benchmarks/attention.py --backends mosaic,mosaic_1wg,mosaic_1wg_bwd,mosaic_no_pingpong,mosaic_p_smem \
  --shapes paper --seqs 4096 --head-dims 128 --causal true --iters 10 --no-torch $DRY 2>&1 | tee -a "$OUT/attention.txt" || status=1

echo "== calibration: this GPU's GEMM, HBM, launch and host-loop rates and our kernels' attention rates"
echo "   (from the tables above), for python -m genesis_jax.plan --calibration"
timeout "$(limit 40)" python benchmarks/calibrate.py --attention-csv "$OUT/attention.csv" --out "$OUT/calibration.json" \
  $DRY 2>&1 | grep -v -E '^(step|val) ' | tee "$OUT/calibration.txt" || status=1

echo "== train step: bare jitted step vs training loop, two model sizes, bf16; the measured peak memory and"
echo "   step time beside those python -m genesis_jax.plan predicts for this GPU (compiled deviceless),"
echo "   with the published constants and with the calibration above"
CAL=$([ -f "$OUT/calibration.json" ] && echo "--calibration $OUT/calibration.json")
# shellcheck disable=SC2086  # TINY_STEP and CAL are words on purpose
timeout "$(limit 200)" python benchmarks/train_step.py --config configs/gpu_bench.toml --steps 20 --loop-steps 40 \
  --plan-target auto $CAL $TINY_STEP \
  --variant "deep_narrow_40:model.preset=deep_narrow_40" \
  --variant "microscope:model.preset=microscope" \
  --variant "deep_narrow_40-wwm:model.preset=deep_narrow_40,mask=wwm" \
  --variant "deep_narrow_40-span:model.preset=deep_narrow_40,mask=span" \
  --out "$OUT/train_step.csv" 2>&1 | grep -v -E '^(step|val) ' | tee "$OUT/train_step.txt" || status=1

if [ $REHEARSE = 1 ]; then
  echo "== rehearsal: each train-step variant's program compiled for an H200 (python -m genesis_jax.plan)"
  corpus=$(python -c "import sys, tempfile; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from synthetic import synthetic_corpus; print(synthetic_corpus(Path(tempfile.gettempdir()) / 'genesis_jax_bench_corpus'))")
  for preset in deep_narrow_40 microscope; do
    timeout 600 python -m genesis_jax.plan --config configs/gpu_bench.toml --set model.preset=$preset \
      --set data.corpus="$corpus" --target h200 2>&1 | tee -a "$OUT/plan.txt" || status=1
  done
fi

echo "suite finished with status $status; tables in $OUT"
exit $status
