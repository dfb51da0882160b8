#!/usr/bin/env bash
# Run on this (network-connected) side before a GPU run: fills .gpu_carry/ (git-ignored) with what
# benchmarks/gpu_check.sh needs and a borrowed GPU machine lacks, since it cannot download:
#   .gpu_carry/home/datasets/mnist.npz   MNIST as tinycnn caches it, compressed (~11 MB), checked there by SHA-256
#   .gpu_carry/wheels/                   Keras 3 and the two of its needs missing from the device image (Python 3.12)
# Then: the device tool's run with carry=[".gpu_carry"] and command "bash benchmarks/gpu_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
mkdir -p "$CARRY/home/datasets" "$CARRY/wheels"
python3 - "$CARRY/home/datasets/mnist.npz" <<'PY'
import sys

import numpy as np

from tinycnn.datasets import mnist

(x_train, y_train), (x_test, y_test) = mnist.load_data()  # its cache, or its verified sources
np.savez_compressed(sys.argv[1], x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
PY
TINYCNN_HOME="$PWD/$CARRY/home" python3 -c "from tinycnn.datasets import mnist; mnist.load_data()"  # verifies
rm -f "$CARRY"/wheels/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" keras==3.15.1 namex optree
du -sh "$CARRY"
