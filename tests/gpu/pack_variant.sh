#!/usr/bin/env bash
# Adds a build of the working tree, as it is now, to .device/ beside what tests/gpu/pack.sh
# packed: .device/NAME/bench and the named test binaries (stripped), for an A/B of builds in
# one machine session (tests/gpu/ab_rounds.sh, a variant LABEL@NAME=). On this machine, from
# the repository root:
#
#   bash tests/gpu/pack.sh                      # the baseline, once: .device/bench, tests, ...
#   (edit)  bash tests/gpu/pack_variant.sh NAME [TEST ...]   e.g. pairs cuda_lora
#
# It builds in target/ as usual (the next pack.sh rebuilds what changed) and fails when
# .device/ would pass the 64 MiB a device call carries.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { sed -n 2,11p "$0"; exit 2; }
name=$1
shift
[ -f .device/libfusedmoe.so ] || { echo "error: run tests/gpu/pack.sh first" >&2; exit 1; }
dest=.device/$name
rm -rf "$dest"
mkdir -p "$dest"
cargo build --release --example bench
cp target/release/examples/bench "$dest/"
for t in "$@"; do
  exe=$(cargo test --release --no-run --test "$t" --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line) if line.startswith("{") else {}
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
  [ -n "$exe" ] || { echo "error: no test binary for tests/$t.rs" >&2; exit 1; }
  cp "$exe" "$dest/$t"
done
strip --strip-debug "$dest"/*
total=$(du -sb .device | cut -f1)
echo "$dest: $(ls "$dest" | paste -sd' '); .device is $((total / 1024 / 1024)) MiB"
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
  echo "error: .device is over 64 MiB, the most a run carries" >&2
  exit 1
fi
