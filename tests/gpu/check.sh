#!/usr/bin/env bash
# Checks the CUDA backend on a GPU machine with what tests/gpu/pack.sh put in .device/ (no Rust
# needed there: the driver, a CUDA 13 NVRTC, compute-sanitizer, and python3 with torch, numpy
# and pytest). From the repository root:
#
#   bash tests/gpu/check.sh [step ...]        (also runs as .device/check.sh)
#
# Steps, in this order when none is named:
#   nvidia-smi  the GPUs (nvidia-smi -L), the driver, and the NVRTC, sanitizer and torch found
#   tests       every packed test binary with FUSEDMOE_REQUIRE_GPU=1 (a skip is a failure),
#               one step each (test-<name>, also a step name of its own); not hosts and
#               header, which need the build machine's toolchains
#   demo        the demo example on --device cuda
#   pytest      examples/python/test_torch.py: torch CUDA tensors, torch streams, CUDA graphs
#   memcheck    compute-sanitizer --tool memcheck on tests/cuda, tests/cuda_gated and tests/cuda_lora, FUSEDMOE_GPU_REDUCED=1
#   racecheck   compute-sanitizer --tool racecheck, likewise
# Also by name only: synccheck, initcheck (the other two sanitizer tools, likewise).
#
# Each step writes $OUT/<step>.log and appends "PASS|FAIL <step> <seconds>s" to
# $OUT/summary.txt (OUT defaults to .device/results). Every step runs; the exit status is 1
# when any failed. Environment: FUSEDMOE_NVRTC_PATH (else found: the CUDA toolkit, then
# PyPI's nvidia/*/lib, then ldconfig), FUSEDMOE_CACHE_DIR (default /tmp/fusedmoe-cache),
# FUSEDMOE_STEP_TIMEOUT (seconds per step; default none).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -n "${FUSEDMOE_DEVICE_DIR:-}" ]; then
  DEV=$FUSEDMOE_DEVICE_DIR
elif [ -f "$here/libfusedmoe.so" ]; then
  DEV=$here
else
  DEV=$(cd "$here/../.." && pwd)/.device
fi
if [ ! -f "$DEV/libfusedmoe.so" ]; then
  echo "error: no $DEV/libfusedmoe.so: run 'bash tests/gpu/pack.sh' on the build machine and carry .device" >&2
  exit 2
fi
DEV=$(cd "$DEV" && pwd)
OUT=${OUT:-$DEV/results}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
STEP_TIMEOUT=${FUSEDMOE_STEP_TIMEOUT:-}

find_nvrtc() {
  local c
  for c in /usr/local/cuda/lib64/libnvrtc.so.13 /usr/local/cuda/targets/*/lib/libnvrtc.so.13 \
    /usr/local/cuda-13*/lib64/libnvrtc.so.13 /usr/local/cuda-13*/targets/*/lib/libnvrtc.so.13 \
    /usr/lib/x86_64-linux-gnu/libnvrtc.so.13 /usr/lib64/libnvrtc.so.13; do
    if [ -f "$c" ]; then
      echo "$c"
      return
    fi
  done
  c=$(python3 - 2>/dev/null <<'EOF'
import glob, os
try:
    import nvidia  # PyPI's nvidia-* wheels (torch's cu13 wheels depend on them)
except ImportError:
    raise SystemExit
for root in nvidia.__path__:
    hits = sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.13*")))
    if hits:
        print(hits[0])
        break
EOF
  )
  if [ -n "$c" ]; then
    echo "$c"
    return
  fi
  ldconfig -p 2>/dev/null | awk '$1 == "libnvrtc.so.13" { print $NF; exit }'
}

find_sanitizer() {
  local c
  if command -v compute-sanitizer 2>/dev/null; then
    return
  fi
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-13*/bin/compute-sanitizer \
    /usr/local/cuda/compute-sanitizer/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer; do
    if [ -x "$c" ]; then
      echo "$c"
      return
    fi
  done
}

if [ -z "${FUSEDMOE_NVRTC_PATH:-}" ]; then
  FUSEDMOE_NVRTC_PATH=$(find_nvrtc)
fi
export FUSEDMOE_NVRTC_PATH
export FUSEDMOE_REQUIRE_NVRTC=1
export FUSEDMOE_CACHE_DIR=${FUSEDMOE_CACHE_DIR:-/tmp/fusedmoe-cache}
export FUSEDMOE_LIB=$DEV/libfusedmoe.so
nvrtc_dir=""
if [ -n "$FUSEDMOE_NVRTC_PATH" ]; then
  nvrtc_dir=$(dirname "$FUSEDMOE_NVRTC_PATH"):
fi
export LD_LIBRARY_PATH=$DEV:$nvrtc_dir${LD_LIBRARY_PATH:-}
SANITIZER=$(find_sanitizer)
PYDIR=$DEV/python
[ -d "$PYDIR" ] || PYDIR=$(pwd)/examples/python
mkdir -p "$FUSEDMOE_CACHE_DIR"

failed=0

# limited COMMAND...: the command, killed after FUSEDMOE_STEP_TIMEOUT seconds when that is set.
limited() {
  if [ -n "$STEP_TIMEOUT" ]; then
    timeout -k 10 "$STEP_TIMEOUT" "$@"
  else
    "$@"
  fi
}

# step NAME COMMAND...: runs it with its output in $OUT/NAME.log, then the summary line.
# COMMAND is a program (run through `limited`) or one of the functions below (which use it).
step() {
  local name=$1 log=$OUT/$1.log rc start end result
  shift
  if ! declare -F "$1" >/dev/null; then
    set -- limited "$@"
  fi
  echo "== $name"
  start=$(date +%s.%N)
  {
    echo "\$ $*"
    "$@"
  } >"$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  if [ "$rc" -eq 0 ]; then
    result=PASS
  else
    result=FAIL
    failed=1
  fi
  awk -v r="$result" -v n="$name" -v s="$start" -v e="$end" -v rc="$rc" \
    'BEGIN { printf "%s %s %.1fs%s\n", r, n, e - s, (rc == 0 ? "" : " (exit " rc ")") }' |
    tee -a "$SUMMARY"
  if [ "$rc" -ne 0 ]; then
    tail -n 30 "$log" | sed 's/^/   | /'
  fi
}

environment() {
  nvidia-smi -L || return 1
  nvidia-smi
  echo
  echo "library:            $FUSEDMOE_LIB"
  echo "FUSEDMOE_NVRTC_PATH=${FUSEDMOE_NVRTC_PATH:-(not found)}"
  echo "FUSEDMOE_CACHE_DIR=$FUSEDMOE_CACHE_DIR"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "compute-sanitizer:  ${SANITIZER:-(not found)}"
  [ -n "$SANITIZER" ] && "$SANITIZER" --version
  python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())'
  if [ -z "$FUSEDMOE_NVRTC_PATH" ]; then
    echo "error: no libnvrtc.so.13 found; set FUSEDMOE_NVRTC_PATH" >&2
    return 1
  fi
}

# test_binary NAME: one packed test binary, required to find the GPU.
test_binary() {
  local extra=()
  case $1 in cuda | cuda_lora) extra=(--nocapture) ;; esac # a line per case as it ends: errors and times
  step "test-$1" env FUSEDMOE_REQUIRE_GPU=1 "$DEV/tests/$1" ${extra[@]+"${extra[@]}"}
}

test_binaries() {
  local bin name
  for bin in "$DEV"/tests/*; do
    name=$(basename "$bin")
    case $name in
    hosts | header) continue ;; # cmake, Go, a C compiler and the source tree: the build machine's
    esac
    test_binary "$name"
  done
}

torch_tests() {
  local out rc
  out=$(cd "$PYDIR" && limited python3 -m pytest -v -p no:cacheprovider test_torch.py 2>&1)
  rc=$?
  printf '%s\n' "$out"
  [ "$rc" -eq 0 ] || return "$rc"
  if printf '%s\n' "$out" | tail -n 1 | grep -q skipped; then
    echo "error: tests were skipped on a GPU machine" >&2
    return 1
  fi
}

sanitize() {
  if [ -z "$SANITIZER" ]; then
    echo "error: compute-sanitizer not found (CUDA toolkit's bin/)" >&2
    return 1
  fi
  # FUSEDMOE_GPU_SANITIZER: the tests leave out their stream gate (serialized launches would
  # deadlock on it) and run their cases one at a time; with --test-threads=1, one host thread
  # launches at a time (racecheck deadlocks otherwise)
  # (cuda_gated: the out-of-range ids, which are what memcheck should see dropped; cuda_lora:
  # the LoRA kernels, bad adapter ids among them)
  local t
  for t in cuda cuda_gated cuda_lora; do
    FUSEDMOE_GPU_REDUCED=1 FUSEDMOE_REQUIRE_GPU=1 FUSEDMOE_GPU_SANITIZER=1 \
      limited "$SANITIZER" --tool "$1" --error-exitcode 1 "$DEV/tests/$t" --nocapture \
      --test-threads=1 || return 1
  done
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(nvidia-smi tests demo pytest memcheck racecheck)
for s in "${steps[@]}"; do
  case $s in
  nvidia-smi) step nvidia-smi environment ;;
  tests) test_binaries ;;
  test-*)
    if [ -x "$DEV/tests/${s#test-}" ]; then
      test_binary "${s#test-}"
    else
      echo "no test binary $DEV/tests/${s#test-}" >&2
      failed=1
    fi
    ;;
  demo) step demo "$DEV/demo" --device cuda ;;
  pytest) step pytest torch_tests ;;
  memcheck | racecheck | synccheck | initcheck) step "$s" sanitize "$s" ;;
  *)
    echo "unknown step $s (nvidia-smi tests test-<name> demo pytest memcheck racecheck synccheck initcheck)" >&2
    failed=1
    ;;
  esac
done

echo "summary ($SUMMARY):"
cat "$SUMMARY"
exit "$failed"
