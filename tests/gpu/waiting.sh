#!/usr/bin/env bash
# One device call for the changes kept off main until they run on a GPU (a merge and its
# revert each; BENCHMARKS.md lists them), packed beside the baseline on the build machine:
#
#   bash tests/gpu/pack.sh
#   bash tests/gpu/pack_revs.sh "cuda_lora" pf8=18b9df3 bsm=8c4dbbb bsmt=95cc549 cta3=94e9a40
#   bash tests/gpu/pack_revs.sh "cuda" pieces=86d17f5
#
# then on the GPU machine, from the repository root: bash tests/gpu/waiting.sh [STEP ...]
#
#   tests   every test binary packed with a variant (.device/NAME/<test>)
#   lora    ab_rounds.sh ROUNDS "--shapes lora" over main and the variants in $LORA
#   decode  ab_rounds.sh ROUNDS over main and $DECODE at M = 1, 4, 16, 64 of the four shapes
#   ncu     the base and the LoRA path's kernels at Qwen3 M = 1024 (ncu_kernels.sh)
#   regs    the registers of every cached cubin (kernel_regs.sh)
#
# Default steps: tests lora decode. ROUNDS (default 2), LORA (default "pf8 bsm bsmt cta3"),
# DECODE (default "pieces"). Each step is cut at what is left of CAP seconds (default 560,
# under the device tool's 600); results go to $OUT/r (else .device/results/waiting) and into
# r.tgz beside it after every step, so a cut call keeps what finished.
set -uo pipefail
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests lora decode)
top=${OUT:-.device/results}
r=$top/r
mkdir -p "$r"
export FUSEDMOE_REQUIRE_GPU=1 FUSEDMOE_LIB=$PWD/.device/libfusedmoe.so \
  FUSEDMOE_CACHE_DIR=${FUSEDMOE_CACHE_DIR:-/tmp/fusedmoe-cache}
[ -n "${FUSEDMOE_NVRTC_PATH:-}" ] ||
  export FUSEDMOE_NVRTC_PATH=$(ls /usr/local/cuda*/targets/*/lib/libnvrtc.so.13 2>/dev/null | head -n 1)
rounds=${ROUNDS:-2}
nvidia-smi -L | tee "$r/gpu.txt"

# step NAME COMMAND...: the command under what is left of CAP, its output in NAME.log
step() {
  local name=$1 left=$((${CAP:-560} - SECONDS)) start=$SECONDS rc
  shift
  if [ "$left" -lt 20 ]; then
    echo "SKIPPED $name (${left} s left)" | tee -a "$r/summary.txt"
    return
  fi
  timeout "$left" "$@" >"$r/$name.log" 2>&1
  rc=$?
  echo "$([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") $name $((SECONDS - start))s" |
    tee -a "$r/summary.txt"
  tail -n 3 "$r/$name.log"
  tar czf "$top/r.tgz" -C "$top" r
}

# main= plus NAME@NAME= for each packed variant named
variants() {
  local specs=(main=) v
  for v in $1; do [ -x ".device/$v/bench" ] && specs+=("$v@$v="); done
  echo "${specs[@]}"
}

for s in "${steps[@]}"; do
  case $s in
  tests)
    for d in .device/*/; do
      [ -x "$d/bench" ] || continue  # a variant's folder (pack_variant.sh)
      for t in "$d"*; do
        [ "$(basename "$t")" = bench ] || step "test_$(basename "$d")_$(basename "$t")" "$t"
      done
    done ;;
  lora)
    read -ra specs <<<"$(variants "${LORA:-pf8 bsm bsmt cta3}")"
    RESULTS=$r/lora step lora bash tests/gpu/ab_rounds.sh "$rounds" "--shapes lora" "${specs[@]}" ;;
  decode)
    read -ra specs <<<"$(variants "${DECODE:-pieces}")"
    RESULTS=$r/decode step decode bash tests/gpu/ab_rounds.sh "$rounds" \
      "--shapes mixtral,qwen3,deepseek,gpt-oss --tokens 1,4,16,64" "${specs[@]}" ;;
  ncu)
    step ncu bash tests/gpu/ncu_kernels.sh "$r/ncu_qwen3_m1024.csv" 40 'moe_' -- \
      .device/bench --shapes qwen3,lora --tokens 1024 --reps 1 ;;
  regs) step regs bash tests/gpu/kernel_regs.sh "$FUSEDMOE_CACHE_DIR" ;;
  *) echo "unknown step $s (tests lora decode ncu regs)" | tee -a "$r/summary.txt" ;;
  esac
done
cat "$r/summary.txt"
