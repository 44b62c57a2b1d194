#!/usr/bin/env bash
# One device call's standard batch, for a session with few device minutes: from the repository
# root on the GPU machine, with .device/ packed by tests/gpu/pack.sh,
#
#   bash tests/gpu/session.sh [STEP ...]          (default: tests bench torch)
#
#   tests   every packed test binary (tests/gpu/check.sh's "tests" step)
#   bench   the full library-alone run: .device/bench --shapes mixtral,qwen3,deepseek,gpt-oss,ep,lora
#   torch   the full same-process run: examples/python/bench_torch.py, JSON and PNG
#   tune    the decode re-tune: .device/tune --quick --tokens 1,4,16,64 (the table goes to
#           tiles.json after each M, so a cut run keeps what it finished); not by default
#
# SESSION_SECONDS (default 560) bounds the whole: a step starts only with 60 s left, and is
# cut at what is left. Everything goes under $RESULTS (default $OUT/session when the device
# tool's $OUT is set, else .device/results/session), then into one session.tgz beside it
# (the device tool brings back at most 8 files), with summary.txt (a line per step) and each
# table's end printed last.
set -uo pipefail
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests bench torch)
budget=${SESSION_SECONDS:-560}
top=${OUT:-.device/results}
results=${RESULTS:-$top/session}
mkdir -p "$results"
summary=$top/summary.txt
: >"$summary"
# on the GPU machine a skip (no GPU, no torch, no NVRTC) is a failure
export FUSEDMOE_REQUIRE_GPU=1 FUSEDMOE_LIB=$PWD/.device/libfusedmoe.so \
  FUSEDMOE_CACHE_DIR=${FUSEDMOE_CACHE_DIR:-/tmp/fusedmoe-cache}
if [ -z "${FUSEDMOE_NVRTC_PATH:-}" ]; then
  FUSEDMOE_NVRTC_PATH=$(ls /usr/local/cuda*/targets/*/lib/libnvrtc.so.13 2>/dev/null | head -n 1)
  export FUSEDMOE_NVRTC_PATH
fi
nvidia-smi -L | tee "$results/gpu.txt"

# run NAME COMMAND...: the command under what is left of the budget, its output in NAME.log.
run() {
  local name=$1 left=$((budget - SECONDS)) rc
  shift
  if [ "$left" -lt 60 ]; then
    echo "SKIPPED $name (${left} s left)" | tee -a "$summary"
    return
  fi
  timeout "$left" "$@" >"$results/$name.log" 2>&1
  rc=$?
  echo "$([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") $name at ${SECONDS}s" | tee -a "$summary"
  tar czf "$top/session.tgz" -C "$top" "$(basename "$results")" summary.txt
}

for s in "${steps[@]}"; do
  case $s in
  tests) run tests env OUT="$results/check" bash tests/gpu/check.sh nvidia-smi tests ;;
  bench) run bench .device/bench --shapes mixtral,qwen3,deepseek,gpt-oss,ep,lora --json "$results/bench.json" ;;
  torch) run torch python3 examples/python/bench_torch.py --json "$results/torch.json" --png "$results/torch.png" ;;
  tune) run tune .device/tune --quick --tokens 1,4,16,64 --out "$results/tiles.json" --json "$results/tune.json" ;;
  *) echo "unknown step $s (tests bench torch tune)" | tee -a "$summary" ;;
  esac
done
for f in check/summary.txt bench.log torch.log tune.log; do
  [ -f "$results/$f" ] && { echo "== $f"; tail -n 40 "$results/$f"; }
done
cat "$summary"
