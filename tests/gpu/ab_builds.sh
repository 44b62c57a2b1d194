#!/usr/bin/env bash
# An A/B of builds in one machine session: the bench of every build, interleaved over ROUNDS
# rounds, then the table of tests/gpu/ab_table.py (ratios to the first build). A build is
# .device/NAME/bench (tests/gpu/pack_variant.sh), or `main` for the .device/bench that
# tests/gpu/pack.sh packed. On the GPU machine, from the repository root:
#
#   bash tests/gpu/ab_builds.sh ROUNDS "BENCH ARGS" BUILD BUILD...
#   e.g. bash tests/gpu/ab_builds.sh 2 "--shapes lora" main pairs
#
# RESULTS: where each run's JSON and log go (default .device/results/ab), as BUILD_rN.json
# and .log; the table is kept as ab_table.md there. A failed run is reported, the others go on.
set -uo pipefail
[ $# -ge 3 ] || { sed -n 2,11p "$0"; exit 2; }
rounds=$1
read -ra bench_args <<<"$2"
shift 2
results=${RESULTS:-.device/results/ab}
mkdir -p "$results"
failed=0
for r in $(seq 1 "$rounds"); do
  for build in "$@"; do
    bench=.device/$build/bench
    [ "$build" = main ] && bench=.device/bench
    start=$(date +%s)
    if "$bench" "${bench_args[@]}" --json "$results/${build}_r$r.json" \
      >"$results/${build}_r$r.log" 2>&1; then
      echo "ran $build round $r ($(($(date +%s) - start)) s)"
    else
      echo "FAILED $build round $r:"
      tail -n 5 "$results/${build}_r$r.log" | sed 's/^/   | /'
      failed=1
    fi
  done
done
specs=()
for build in "$@"; do
  files=$(ls "$results/${build}"_r*.json 2>/dev/null | paste -sd, -)
  [ -n "$files" ] && specs+=("$build=$files")
done
python3 "$(dirname "$0")/ab_table.py" "${specs[@]}" | tee "$results/ab_table.md"
exit "$failed"
