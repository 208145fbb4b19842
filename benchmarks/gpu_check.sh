#!/usr/bin/env bash
# GPU checks in one go, for a machine with an NVIDIA GPU and torch + CUDA (no TensorRT needed):
#   1. the GPU tests: torch CUDA-graph fp16 runtime parity with CPU, CUDA eager fp32, and the
#      TensorRT runtime's page-locked/device buffers with the real pycuda and cuda-python;
#   2. the latency benchmark (torch CUDA graph fp16 at batch 1/8/16, eager, TensorRT if installed);
#   3. a short GPU training run (timing) on the real data when ../shared/data is present.
# Prepare here first (the GPU machine has no package index): bash benchmarks/gpu_wheels.sh
# then carry .whl with the checkout.  Usage there: bash benchmarks/gpu_check.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ]; then
    site=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export LINEINSPECT_GPU_NAME=$($PY -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo none)
echo "GPU: $LINEINSPECT_GPU_NAME"
$PY -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/engines/runtime/test_torch_gpu.py \
    tests/engines/runtime/test_cuda_mem_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
$PY benchmarks/latency.py --threads "$(nproc)" --results "$OUT/latency_gpu.json" 2>&1 | tee "$OUT/latency.log"
if [ -d ../shared/data/magnetic_tile ]; then
    $PY benchmarks/accuracy.py --device cuda --variants full --datasets magnetic_tile --epochs 20 \
        --work "$OUT/acc" --results "$OUT/accuracy_gpu.json" 2>&1 | tail -20 | tee "$OUT/accuracy.log"
fi
