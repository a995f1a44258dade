#!/usr/bin/env bash
# One-shot check of the GPU path, sized for about 10 minutes on one GPU (an H200 here). Run it from the
# repository root; every log and JSON file goes to $OUT (default benchmarks/results/gpu):
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # print the steps, run nothing
#   bash benchmarks/gpu_check.sh --smoke     # every step on the CPU with tiny sizes (checks the script itself)
#
# The time limits add up to 9:20; a normal run takes less.
# Steps: install nibabel and SimpleITK from the wheels in .whl/ (when they are missing), the `gpu` tests, the
# speed benchmark at 64^3 and 128^3 (eager and CUDA graphs), one 128^3 registration with 1024 q_v iterations,
# and a one-GPU torchrun demo training run. Each step has its own time limit; a failed step is logged and the
# script goes on, and summary.txt lists every step's exit status.
set -u -o pipefail

MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --smoke) MODE=smoke ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --smoke]" >&2; exit 2 ;;
esac

OUT=${OUT:-benchmarks/results/gpu}
PYTHON=${PYTHON:-python3}
DEVICE=cuda
SMALL=64
LARGE=128
ITERS=1024
REPEATS="--repeats 20 --warmup 5 --theta-repeats 5 --theta-warmup 2"
DEMO_ITERS=64
if [ "$MODE" = smoke ]; then
  DEVICE=cpu SMALL=12 LARGE=16 ITERS=8 DEMO_ITERS=2 REPEATS="--repeats 2 --warmup 1 --theta-repeats 1 --theta-warmup 1"
fi
export PYTHONUNBUFFERED=1
if [ "$MODE" = dry ]; then
  OUT=$(mktemp -d)  # nothing is written to the real $OUT
  trap 'rm -rf "$OUT"' EXIT
fi
mkdir -p "$OUT"
: > "$OUT/summary.txt"

# step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record the exit status
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  if [ "$MODE" = dry ]; then
    return 0
  fi
  local begin=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local status=${PIPESTATUS[0]}
  echo "$name: exit $status, $((SECONDS - begin)) s" | tee -a "$OUT/summary.txt"
}

# nibabel and SimpleITK are not on the GPU image: install the carried wheels into /tmp/site
if ! "$PYTHON" -c "import nibabel, SimpleITK" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    step install 45 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/nibabel-*.whl .whl/simpleitk-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "nibabel / SimpleITK missing and no wheels in .whl/ (see benchmarks/README.md)" | tee -a "$OUT/summary.txt"
  fi
fi

step environment 20 bash -c "nvidia-smi || true; $PYTHON -c 'import torch, sys; print(sys.version); \
print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())'"

step pytest_gpu 90 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider

# SVF and SVFFD x SSD and LCC, learnt (the baseline's iteration is the learnt one without the CNN), each
# configuration in a fresh process; then SVF with CUDA graphs
SPEED=("$PYTHON" -m benchmarks.speed --device "$DEVICE" --variants learnt $REPEATS)
step speed 150 "${SPEED[@]}" --grids "$SMALL" "$LARGE" --out "$OUT/speed_cuda.json"
step speed_graph 60 "${SPEED[@]}" --grids "$SMALL" "$LARGE" --models SVF --cuda-graph \
  --out "$OUT/speed_cuda.json" --append

# one 128^3 pair with the reference's 1024 q_v iterations, eager and with CUDA graphs (set-up and f(F) included)
REGISTRATION=("$PYTHON" -m benchmarks.speed --device "$DEVICE" --grids "$LARGE" --models SVF
              --metrics SSD LCC --variants baseline --repeats 2 --warmup 1 --theta-repeats 0
              --whole-registration "$ITERS")
step registration 60 "${REGISTRATION[@]}" --out "$OUT/registration.json"
step registration_graph 45 "${REGISTRATION[@]}" --cuda-graph --out "$OUT/registration.json" --append

# the demo training through torchrun: one process, which still joins an nccl process group
step torchrun_demo 90 torchrun --standalone --nproc_per_node=1 train.py -c configs/demo/train.json \
  --device "$DEVICE" --set trainer.no_epochs=1 --set "trainer.no_iters_q_v=$DEMO_ITERS" --set "trainer.save_dir=\"/tmp/gpu_check_saved\"" \
  --set "trainer.save_figures=false"

echo "== summary"
cat "$OUT/summary.txt"
