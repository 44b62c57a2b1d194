#!/usr/bin/env bash
# Profiles kernels of one command with ncu (the sections that say what bounds a kernel:
# SpeedOfLight, Occupancy, LaunchStats, WarpStateStats), then prints tests/gpu/ncu_table.py's
# summary: per kernel its µs, DRAM and SM throughput, occupancy, registers and the warp
# stall reasons that dominate. On the GPU machine, from the repository root:
#
#   bash tests/gpu/ncu_kernels.sh OUT.csv LAUNCHES REGEX -- COMMAND [ARGS...]
#   e.g. bash tests/gpu/ncu_kernels.sh $OUT/decode.csv 8 'moe_' -- .device/bench --shapes qwen3 --tokens 1
#
# ncu times each kernel alone, caches flushed and clocks at base (cold): compare kernels
# within one profile, not with bench's warm medians. The CSV (ncu's raw page) and ncu's log
# (OUT.log) stay for a closer look.
set -uo pipefail
[ $# -ge 5 ] && [ "$4" = "--" ] || { sed -n 2,13p "$0"; exit 2; }
out=$1 launches=$2 regex=$3
shift 4
ncu --kernel-name "regex:$regex" --launch-count "$launches" \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --csv --page raw "$@" >"$out" 2>"${out%.csv}.log"
rc=$?
[ $rc -eq 0 ] || { echo "ncu exited with $rc (log: ${out%.csv}.log)"; tail -n 5 "${out%.csv}.log"; }
python3 "$(dirname "$0")/ncu_table.py" "$out"
