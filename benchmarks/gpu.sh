#!/usr/bin/env bash
# Everything a lent GPU should run, in one go (planned for under 8 minutes on one H100 with 16 cores):
#   1. the CUDA tests (pytest -m cuda) and the resume tests, which run on CUDA when one is visible;
#   2. the CIFAR FixMatch step (WRN-28-2, 64 + 448 x 2) beside USB 0.3.2's, bf16 and fp32, with
#      CalibrateMix's two modes, eager, then compiled, then replayed as CUDA graphs if train.cuda_graphs exists;
#   3. the Pascal UniMatch step (DeepLabV3+ R101, 8 + 8 at 321) beside the release's, bf16 and fp32, eager and
#      compiled.
# Each benchmark writes benchmarks/results/<benchmark>-cuda-<gpu>-<variant>.json, <gpu> from the device name.
#
#   benchmarks/gpu.sh                 # on the GPU machine, from the repository root
#   benchmarks/gpu.sh --device cpu    # smoke run of the same plumbing on a CPU: one round each, small Pascal
#                                     # crop, eager only (COMPILE=1 adds the compiled variants), JSON in a
#                                     # temporary folder (nothing under benchmarks/results)
# Planned, not yet measured: tests 1.5 min, CIFAR eager 1 min and compiled 2 min, Pascal 1 + 1 + 2 min.
# Environment: PYTHON (default: python3), TRUSTMATCH_PEERS (the peer bundles; default ../shared/peers, else
# shared/peers: a device call carries only the checkout, so copy them into shared/peers there),
# SECTIONS (default "tests step seg"), OUT (the JSON folder).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE=${2:?--device needs cpu or cuda}; fi
if [[ "$DEVICE" != cuda && "$DEVICE" != cpu ]]; then echo "gpu.sh: --device $DEVICE: use cuda or cpu" >&2; exit 2; fi
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
SECTIONS=${SECTIONS:-tests step seg}

if [[ "$DEVICE" == cuda ]]; then
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: no CUDA device visible to torch: run it on the GPU machine, or --device cpu for the smoke run" >&2
    exit 2
  fi
  OUT=${OUT:-benchmarks/results}
  GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
  REPEATS=20; WARMUP=5; SEG_REPEATS=10; SEG_WARMUP=3; SEG_SHAPE=(--workers 8)
  USB=(usb usb-amp); PRECISIONS=(bf16 fp32); CMIX=(off faithful efficient); COMPILE=${COMPILE:-1}; SLOW=1
  nvidia-smi -L || true
else
  OUT=${OUT:-$(mktemp -d -t gpu-sh-smoke-XXXX)}
  GPU=cpu-smoke
  REPEATS=1; WARMUP=0; SEG_REPEATS=1; SEG_WARMUP=0; SEG_SHAPE=(--crop 33 --batch 2)
  USB=(usb); PRECISIONS=(bf16); CMIX=(off); COMPILE=${COMPILE:-0}; SLOW=${SLOW:-10}  # a CPU step takes seconds
fi
"$PY" -c "import torch, os; print('torch', torch.__version__, '| threads', torch.get_num_threads(), '| cores', os.cpu_count())"
echo "gpu.sh: device $DEVICE ($GPU), JSON into $OUT, sections: $SECTIONS"
GRAPHS=$("$PY" -c "from trustmatch.config import TrainConfig; print(int('cuda_graphs' in TrainConfig.__dataclass_fields__))")

FAILED=()
run() {  # run NAME LIMIT_S COMMAND...: time one part; a failure is recorded and the rest still runs
  local name=$1 limit=$(($2 * SLOW)); shift 2
  local start=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  if [[ $rc -ne 0 ]]; then FAILED+=("$name (exit $rc)"); fi
}

if [[ " $SECTIONS " == *" tests "* ]]; then
  run cuda-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests
  if [[ "$DEVICE" == cuda ]]; then  # train.device=auto: these run on the GPU (the torchrun ones pin the CPU)
    XDIST=(); if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
    run resume-tests 150 "$PY" -m pytest -q -p no:cacheprovider "${XDIST[@]}" -k "resume and not torchrun" \
      tests/test_train.py tests/test_calibratemix.py tests/test_segmentation_train.py tests/test_interruptions.py
  fi
fi

step() {  # step VARIANT MODES EXTRA...: the CIFAR step and USB's, every precision, CalibrateMix in MODES
  local variant=$1 modes=$2; shift 2
  run "step-$variant" 240 "$PY" benchmarks/step_time.py --device "$DEVICE" --methods fixmatch \
    --precisions "${PRECISIONS[@]}" --calibratemix $modes --peer "${USB[@]}" \
    --repeats "$REPEATS" --warmup "$WARMUP" --out "$OUT" --tag "$GPU-$variant" "$@"
}
if [[ " $SECTIONS " == *" step "* ]]; then
  step eager "${CMIX[*]}"
  if [[ $COMPILE == 1 ]]; then step compile off --compile; fi  # one compile per trainer: the base step only
  if [[ $GRAPHS == 0 ]]; then echo "=== no train.cuda_graphs in this tree: graphs not timed"
  elif [[ $DEVICE == cuda ]]; then step graphs off --compile --train cuda_graphs=true; fi
  step prefetch off --prefetch 8  # 8 steps in a row per round without and with train.prefetch=on
fi

seg() {  # seg VARIANT EXTRA...: the Pascal UniMatch step and the release's (fp32 as released, and bf16)
  local variant=$1; shift
  run "seg-$variant" 240 "$PY" benchmarks/seg_step_time.py --shape pascal --device "$DEVICE" --methods unimatch \
    "${SEG_SHAPE[@]}" --peer unimatch unimatch-bf16 --repeats "$SEG_REPEATS" --warmup "$SEG_WARMUP" \
    --out "$OUT" --tag "$GPU-$variant" "$@"
}
if [[ " $SECTIONS " == *" seg "* ]]; then
  seg bf16-eager
  seg fp32-eager --set train.amp=false
  if [[ $COMPILE == 1 ]]; then seg bf16-compile --compile; fi
  seg bf16-prefetch --prefetch 4  # the file pipeline built in the producer thread during the step
fi

echo "gpu.sh: done in $SECONDS s; JSON in $OUT"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  printf 'gpu.sh: failed: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
