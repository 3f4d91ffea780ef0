#!/usr/bin/env bash
# A wheelhouse for benchmarks/gpu_check.py on a GPU machine that has torch but no package index:
# omnistream itself (no dependencies) and the small packages its Trainer path imports there. Ray and
# MLflow are not needed (the check runs the Trainer with world size 1 and an in-memory tracker).
#   benchmarks/gpu_wheelhouse.sh 3.12 [wheelhouse]     # the GPU machine's Python version
set -euo pipefail
PYVER=${1:?usage: gpu_wheelhouse.sh PYTHON_VERSION [DIR]   e.g. 3.12}
DIR=${2:-wheelhouse}
cd "$(dirname "$0")/.."
mkdir -p "$DIR"
PY=${PYTHON:-python3}
# pure-Python or manylinux wheels for the target interpreter; deepspeed ships as an sdist, so it is built
# here once (no CUDA ops compiled: DS_BUILD_OPS=0, they are JIT-built where needed)
$PY -m pip download -q --only-binary=:all: --python-version "$PYVER" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp -d "$DIR" \
    hjson msgpack ninja py-cpuinfo psutil einops packaging tqdm pydantic pydantic-core annotated-types \
    typing-extensions typing-inspection tokenizers huggingface-hub filelock fsspec pyyaml requests \
    urllib3 idna certifi charset-normalizer hf-xet numpy safetensors tomli-w braceexpand webdataset pillow
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$DIR" "deepspeed==$($PY -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1)"
$PY -m pip wheel -q --no-deps -w "$DIR" .
du -sh "$DIR"
