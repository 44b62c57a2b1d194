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
#           tiles.json after each M, so a cut run keeps what it finished); not by default.
#           TUNE_TOKENS and TUNE_SHAPES change the points: TUNE_TOKENS=4096,16384 re-tunes
#           prefill, where 128x256 tiles now take the multicast loop and may win more entries
#
# Steps for the changes kept off main until they run on a GPU (a merge and its revert, or a
# branch kept by an unapplied merge; BENCHMARKS.md lists them), packed beside the baseline on the build machine, by name only:
#
#   bash tests/gpu/pack.sh
#   bash tests/gpu/pack_revs.sh "" wsp=ea750e0                 # benches only (tests passed)
#   bash tests/gpu/pack_revs.sh "cuda" mc=HEAD                 # mc-tests, mc-ab, ncu-mc
#   mkdir -p .device/final && cp <a build's bench> .device/final/   # final-ab
#
# The device tool's 64 MiB counts the tracked files too (about 6 MB): carry only the .device/
# paths the steps use (.device/bench, .device/libfusedmoe.so, .device/check.sh, the named
# variants; .device/tests for the tests step).
#
#   variant-tests  every test binary packed with a variant (.device/NAME/<test>; VARIANTS: only
#                  these names)
#   lora-ab        ab_rounds.sh ROUNDS "--shapes lora" over main and the variants in $LORA
#   decode-ab      ab_rounds.sh ROUNDS over main and $DECODE at M = 1, 4, 16, 64, four shapes
#   ws-ab          the persistent warp-specialised GEMMs (.device/wsp, cuda.wgmma_ws=1) against
#                  main at M = 4096 ($WS_SHAPES, default qwen3,deepseek,gpt-oss: 128x128
#                  tiles): with the table's 3 stages and with 6 (the twelfth session's lead)
#   mc-tests       the multicast build's CUDA tests (.device/mc/cuda: pack_revs.sh "cuda" mc=REV;
#                  MC_TESTS: a test-name filter)
#   mc-ab          main against the multicast build with cuda.wgmma_multicast=1 (mc) and
#                  without (mc0), $MC_SHAPES (default all four) at $MC_TOKENS (1024,4096,16384)
#   ncu-mc         the multicast GEMMs at Qwen3 M = 4096 (ncu_kernels.sh)
#   final-ab       main against a build of the session's end (.device/final/bench), at
#                  $FINAL_SHAPES (mixtral,qwen3,lora) and $FINAL_TOKENS (1024,4096,16384)
#   ncu            the base and the LoRA path's kernels at Qwen3 M = 1024 (ncu_kernels.sh)
#   regs           the registers of every cached cubin (kernel_regs.sh)
#   fc-tests       the CUDA test of GEMM2 doing the combine (.device/tests/cuda gemm2_combining)
#   fc-ab          main against cuda.fuse_combine=64 (fc) at decode, $FC_SHAPES (the four) at
#                  $FC_TOKENS (1,4,16,64); only after fc-tests passed
#   down-tests     the CUDA tests of GEMM2 at its own BLOCK_N (cuda and cuda_lora's
#                  gemm2_at_its_own_block_n_matches_the_cpu)
#   down-ab        main against GEMM2 at its own BLOCK_N (tile.block_n_down 128 and 256) at
#                  decode, $DOWN_SHAPES (qwen3,deepseek,gpt-oss) at $DOWN_TOKENS (1,4): what
#                  the tuner's BLOCK_N_DOWN candidates may find; only after down-tests passed
#   timeline       each kernel's start and end inside the bench's graph replays (nsys,
#                  graph_timeline.sh) at $TL_SHAPES (qwen3,deepseek,gpt-oss), $TL_TOKENS (1,4);
#                  TL_ARGS: more bench args (nsys only; without it torch's profiler)
# ROUNDS (default 2), LORA (default "lorax bsmt"), DECODE (default "pieces awarp"); a name
# with no .device/NAME/bench is left out.
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

# ab NAME "BENCH ARGS" "VARIANT ...": ab_rounds.sh over main and each variant whose build is
# packed; a VARIANT is a build's NAME (its bench as it is) or LABEL@NAME=OPTIONS.
ab() {
  local name=$1 args=$2 specs=(main=) v build
  for v in $3; do
    [[ $v == *@* ]] || v="$v@$v="
    build=${v#*@} build=${build%%=*}
    [ -x ".device/$build/bench" ] && specs+=("$v")
  done
  RESULTS=$results/$name run "$name" bash tests/gpu/ab_rounds.sh "${ROUNDS:-2}" "$args" "${specs[@]}"
}

for s in "${steps[@]}"; do
  case $s in
  tests) run tests env OUT="$results/check" bash tests/gpu/check.sh nvidia-smi tests ;;
  bench) run bench .device/bench --shapes mixtral,qwen3,deepseek,gpt-oss,ep,lora --json "$results/bench.json" ;;
  torch) run torch python3 examples/python/bench_torch.py --json "$results/torch.json" --png "$results/torch.png" ;;
  tune) run tune .device/tune --quick --shapes "${TUNE_SHAPES:-mixtral,qwen3,deepseek,gpt-oss}" \
    --tokens "${TUNE_TOKENS:-1,4,16,64}" --out "$results/tiles.json" --json "$results/tune.json" ;;
  variant-tests)
    for d in .device/*/; do
      [ -x "$d/bench" ] || continue  # a variant's folder (pack_variant.sh)
      [ -z "${VARIANTS:-}" ] || [[ " $VARIANTS " == *" $(basename "$d") "* ]] || continue
      for t in "$d"*; do
        [ "$(basename "$t")" = bench ] || run "test_$(basename "$d")_$(basename "$t")" "$t"
      done
    done ;;
  lora-ab) ab lora-ab "--shapes lora" "${LORA:-lorax bsmt}" ;;
  decode-ab) ab decode-ab "--shapes mixtral,qwen3,deepseek,gpt-oss --tokens 1,4,16,64" "${DECODE:-pieces awarp}" ;;
  ws-ab)
    ab ws-ab "--shapes ${WS_SHAPES:-qwen3,deepseek,gpt-oss} --tokens 4096" \
      "wsp@wsp=cuda.wgmma_ws=1 ws6@wsp=cuda.wgmma_ws=1;tile.num_stages=6" ;;
  # a hung pair must not take the call; MC_TESTS: a name filter
  mc-tests) run mc-tests timeout 300 .device/mc/cuda ${MC_TESTS:-} ;;
  mc-ab)
    grep -q "^PASS mc-tests" "$summary" || { echo "SKIPPED mc-ab (mc-tests did not pass)" | tee -a "$summary"; continue; }
    ab mc-ab "--shapes ${MC_SHAPES:-mixtral,qwen3,deepseek,gpt-oss} --tokens ${MC_TOKENS:-1024,4096,16384}" \
      "mc@mc=cuda.wgmma_multicast=1 mc0@mc=" ;;
  final-ab) ab final-ab "--shapes ${FINAL_SHAPES:-mixtral,qwen3,lora} --tokens ${FINAL_TOKENS:-1024,4096,16384}" final ;;
  ncu-mc) grep -q "^PASS mc-tests" "$summary" || continue
    run ncu-mc timeout 240 bash tests/gpu/ncu_kernels.sh "$results/ncu_mc_qwen3_m4096.csv" 8 'moe_gemm' -- \
    .device/mc/bench --shapes qwen3 --tokens 4096 --reps 1 --option cuda.wgmma_multicast=1 ;;
  ncu) run ncu bash tests/gpu/ncu_kernels.sh "$results/ncu_qwen3_m1024.csv" 40 'moe_' -- \
    .device/bench --shapes qwen3,lora --tokens 1024 --reps 1 ;;
  fc-tests) run fc-tests timeout 300 .device/tests/cuda gemm2_combining ;;
  fc-ab)
    grep -q "^PASS fc-tests" "$summary" || { echo "SKIPPED fc-ab (fc-tests did not pass)" | tee -a "$summary"; continue; }
    RESULTS=$results/fc-ab run fc-ab bash tests/gpu/ab_rounds.sh "${ROUNDS:-2}" \
      "--shapes ${FC_SHAPES:-mixtral,qwen3,deepseek,gpt-oss} --tokens ${FC_TOKENS:-1,4,16,64}" \
      main= fc=cuda.fuse_combine=64 ;;
  down-tests) run down-tests bash -c 'timeout 300 .device/tests/cuda gemm2_at_its_own_block_n &&
    timeout 300 .device/tests/cuda_lora gemm2_at_its_own_block_n' ;;
  down-ab)
    grep -q "^PASS down-tests" "$summary" || { echo "SKIPPED down-ab (down-tests did not pass)" | tee -a "$summary"; continue; }
    RESULTS=$results/down-ab run down-ab bash tests/gpu/ab_rounds.sh "${ROUNDS:-2}" \
      "--shapes ${DOWN_SHAPES:-qwen3,deepseek,gpt-oss} --tokens ${DOWN_TOKENS:-1,4}" \
      main= w128=tile.block_n_down=128 w256=tile.block_n_down=256 ;;
  timeline) run timeline bash tests/gpu/graph_timeline.sh "$results/timeline" \
    --shapes "${TL_SHAPES:-qwen3,deepseek,gpt-oss}" --tokens "${TL_TOKENS:-1,4}" ${TL_ARGS:-} ;;
  regs) run regs bash tests/gpu/kernel_regs.sh "$FUSEDMOE_CACHE_DIR" ;;
  *) echo "unknown step $s (tests bench torch tune variant-tests lora-ab decode-ab ws-ab mc-tests mc-ab ncu-mc final-ab ncu regs timeline fc-tests fc-ab)" | tee -a "$summary" ;;
  esac
done
for f in check/summary.txt bench.log torch.log tune.log lora-ab.log decode-ab.log ws-ab.log mc-tests.log mc-ab.log ncu-mc.log final-ab.log ncu.log timeline.log fc-tests.log fc-ab.log; do
  [ -f "$results/$f" ] && { echo "== $f"; tail -n 40 "$results/$f"; }
done
cat "$summary"
