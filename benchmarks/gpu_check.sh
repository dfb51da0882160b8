#!/usr/bin/env bash
# One command for the first GPU (issue 13, part 5): on a bare borrowed H100/H200 machine, in about
# 9 minutes at most, runs
#   1. what the machine is (nvidia-smi, the Python packages);
#   2. the tests marked gpu (every kernel against the reference and against the same CUDA source
#      played on the CPU, gradient checks in float64, training on the GPU backend);
#   3. the full 20-epoch Week2 example on the GPU (examples/week2_mnist.py --device gpu), with eager
#      steps, then with its steps captured as CUDA graphs (TINYCNN_STEP=graphs; the same epochs to the
#      bit is what tinycnn.static_step promises);
#   4. the benchmark: tinycnn eager and captured against PyTorch eager, PyTorch with CUDA graphs and
#      Keras 3 on JAX (benchmarks/run.py --device gpu: step, epoch, inference, one image, kernels).
# Every log and figure goes into OUT_DIR/gpu_check/, then into OUT_DIR/gpu_check.tar.gz (one file
# comes back from the device tool; unpack it under benchmarks/results/ and results/ to commit).
# Each part has its own time limit, so one that hangs costs only its share; summary.txt lists
# each part's exit status and seconds.
#
#   bash benchmarks/gpu_carry.sh                  # first, here: MNIST and the Keras wheels into .gpu_carry/
#   device run: command "bash benchmarks/gpu_check.sh", carry [".gpu_carry"], timeout_s 580
#   (OUT_DIR defaults to $OUT, the device tool's folder that comes back; else ./gpu_check_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
RESULTS="$OUT_DIR/gpu_check"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
if compgen -G ".gpu_carry/wheels/*.whl" > /dev/null; then  # Keras for its JAX backend
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .gpu_carry/wheels/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
[ -f .gpu_carry/home/datasets/mnist.npz ] && export TINYCNN_HOME="$PWD/.gpu_carry/home"

part() {  # part NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    rc=$?
    echo "$name exit=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$RESULTS/summary.txt"
    tail -n 5 "$RESULTS/$name.log"
}

part machine 20 bash -c "nvidia-smi; $PY -c 'import sys, numpy, numba, cupy; print(sys.version); \
print(\"numpy\", numpy.__version__, \"numba\", numba.__version__, \"cupy\", cupy.__version__); \
import tinycnn.backend as b; print(\"gpu_problem:\", b.gpu_problem())'; \
$PY -m pip list 2>/dev/null | grep -iE '^(torch|jax|jaxlib|keras|cupy|nvidia-cuda-nvrtc|numpy|numba) '"
part tests 120 $PY -m pytest -q -rs -m gpu -p no:cacheprovider --continue-on-collection-errors tests
part week2 110 $PY examples/week2_mnist.py --device gpu --out "$RESULTS/week2_gpu"
part week2_graphs 80 env TINYCNN_STEP=graphs $PY examples/week2_mnist.py --device gpu --out "$RESULTS/week2_gpu_graphs"
part bench 200 $PY benchmarks/run.py --device gpu --repeats 2 --steps 50 --timeout 60 --out "$RESULTS/bench"
# a bench part cut short leaves results.json (written after each framework): render what it holds
[ -f "$RESULTS/bench/results.json" ] && [ ! -f "$RESULTS/bench/RESULTS.md" ] \
    && $PY benchmarks/run.py --render "$RESULTS/bench/results.json" --out "$RESULTS/bench" > /dev/null 2>&1
tar czf "$OUT_DIR/gpu_check.tar.gz" -C "$OUT_DIR" gpu_check && cp "$RESULTS/summary.txt" "$OUT_DIR/summary.txt"
echo "== wrote $OUT_DIR/gpu_check.tar.gz"
