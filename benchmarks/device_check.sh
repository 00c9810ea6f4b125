#!/usr/bin/env bash
# One accelerator call: the Pallas kernels checked against their references, their tiles swept and timed
# (gpu_kernels.py), then end-to-end speculative decoding on the embedded target's architecture with the swept
# tiles and with the default ones (device_e2e.py). ~9 min on one H200.
# Knobs (environment): SWEEP_BUDGET, KERNELS_BUDGET (timing grid), KERNELS_ARGS (default --skip_acceptance; pass
# e.g. "--acceptance_batches 1,8" to time the acceptance step), E2E_GROUPS, E2E_BUDGET, *_TIMEOUT.
#   bash benchmarks/device_check.sh        # results under $OUT (default /tmp/device_check)
# Before: python benchmarks/device_e2e.py --prepare benchmarks/device_inputs  (here, where the GGUF is).
set -uo pipefail
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
rm -f "$OUT/tiles.json"  # never a stale table from an earlier run
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
$PY -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tail -3
timeout "${KERNELS_TIMEOUT:-300}" $PY benchmarks/gpu_kernels.py --output "$OUT/gpu_kernels.json" \
    --budget_s "${KERNELS_BUDGET:-45}" --iters 20 ${KERNELS_ARGS:---skip_acceptance} \
    --tile_sweep --sweep_budget_s "${SWEEP_BUDGET:-180}" --tiles_output "$OUT/tiles.json" 2>&1 | tee "$OUT/gpu_kernels.log"
echo "gpu_kernels exit ${PIPESTATUS[0]}"
# 'pallas' with the tiles the sweep just chose, 'pallas:untuned' with GpuConfig()'s
timeout "${E2E_TIMEOUT:-300}" $PY benchmarks/device_e2e.py --inputs benchmarks/device_inputs \
    --output "$OUT/device_e2e.json" --budget_s "${E2E_BUDGET:-200}" --tiles "$OUT/tiles.json" \
    --impls reference,pallas,pallas:untuned --groups "${E2E_GROUPS:-bfloat16:8,float32:1}" 2>&1 | tee "$OUT/device_e2e.log"
echo "device_e2e exit ${PIPESTATUS[0]}"
