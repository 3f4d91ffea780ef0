#!/usr/bin/env bash
# A wheelhouse for benchmarks/gpu_check.py on a GPU machine that has torch (and numpy, tokenizers, psutil,
# ninja, msgpack, py-cpuinfo, einops, tqdm) but no package index: omnistream itself and the small
# packages its Trainer path needs beyond those. Ray and MLflow are not needed (the check runs the
# Trainer at world size 1 with an in-memory tracker). 6.6 MB for Python 3.12; used on an H100 on 2026-11-27.
#   benchmarks/gpu_wheelhouse.sh 3.12 [wheelhouse]     # the GPU machine's Python version
set -euo pipefail
PYVER=${1:?usage: gpu_wheelhouse.sh PYTHON_VERSION [DIR]   e.g. 3.12}
DIR=${2:-wheelhouse}
cd "$(dirname "$0")/.."
mkdir -p "$DIR"
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
    hjson "pydantic==$($PY -c 'import pydantic; print(pydantic.VERSION)')" pydantic-core annotated-types \
    typing-inspection typing-extensions tomli-w braceexpand webdataset soundfile cffi pycparser
# deepspeed ships as an sdist: built here once, with no CUDA ops compiled (they are JIT-built where needed)
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$DIR" "deepspeed==$($PY -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1)"
$PY -m pip wheel -q --no-deps -w "$DIR" .
du -sh "$DIR"
