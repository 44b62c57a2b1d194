#!/usr/bin/env bash
# An A/B of option sets or builds in one machine session: bench runs of every variant,
# interleaved over ROUNDS rounds (run-to-run noise between machine starts is larger than most
# changes judged), then the table of tests/gpu/ab_table.py. On the GPU machine, from the
# repository root:
#
#   bash tests/gpu/ab_rounds.sh ROUNDS "BENCH ARGS" LABEL[@BUILD]=[KEY=VALUE[;KEY=VALUE...]] ...
#   e.g. bash tests/gpu/ab_rounds.sh 2 "--shapes qwen3 --tokens 1,4" off= on="cuda.prefetch_up=1"
#        bash tests/gpu/ab_rounds.sh 2 "--shapes lora" main= pairs@pairs=
#
# A variant runs BENCH (default .device/bench) with its options, or with @BUILD the bench that
# tests/gpu/pack_variant.sh packed as .device/BUILD/bench. RESULTS: where each run's JSON and
# log go (default .device/results/ab), as LABEL_rN.json and LABEL_rN.log. The table is printed
# last and kept as ab_table.md there. A failed run is reported and the others go on.
set -uo pipefail
[ $# -ge 3 ] || { sed -n 2,16p "$0"; exit 2; }
rounds=$1
read -ra bench_args <<<"$2"
shift 2
bench=${BENCH:-.device/bench}
results=${RESULTS:-.device/results/ab}
mkdir -p "$results"
failed=0
for r in $(seq 1 "$rounds"); do
  for spec in "$@"; do
    label=${spec%%=*}
    run_bench=$bench
    if [[ $label == *@* ]]; then
      run_bench=.device/${label#*@}/bench
      label=${label%@*}
    fi
    flags=()
    IFS=';' read -ra pairs <<<"${spec#*=}"
    for kv in ${pairs[@]+"${pairs[@]}"}; do flags+=(--option "$kv"); done
    start=$(date +%s)
    if "$run_bench" "${bench_args[@]}" ${flags[@]+"${flags[@]}"} --json "$results/${label}_r$r.json" \
      >"$results/${label}_r$r.log" 2>&1; then
      echo "ran $label round $r ($(($(date +%s) - start)) s)"
    else
      echo "FAILED $label round $r:"
      tail -n 5 "$results/${label}_r$r.log" | sed 's/^/   | /'
      failed=1
    fi
  done
done
specs=()
for spec in "$@"; do
  label=${spec%%=*}
  label=${label%@*}
  files=$(ls "$results/${label}"_r*.json 2>/dev/null | paste -sd, -)
  [ -n "$files" ] && specs+=("$label=$files")
done
python3 "$(dirname "$0")/ab_table.py" "${specs[@]}" | tee "$results/ab_table.md"
exit "$failed"
