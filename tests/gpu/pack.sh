#!/usr/bin/env bash
# Packs what the GPU machine needs into .device/ (git-ignored), on this machine (no GPU needed):
#   .device/libfusedmoe.so     the library (the Python host loads it through FUSEDMOE_LIB)
#   .device/tests/<name>       every test binary of `cargo test --release` (lib = unit tests)
#   .device/demo               the demo example
#   .device/bench, .device/tune the benchmark and the tile tuner (BENCHMARKS.md)
#   .device/python/            examples/python/*.py and pytest.ini
#   .device/check.sh           tests/gpu/check.sh
# Binaries lose their debug info (symbols stay, for backtraces); the whole must stay under
# 64 MiB. It empties .device/ first: keep device scripts in the repository (tests/gpu/), not
# there. Then, on the GPU machine, from the repository root: bash tests/gpu/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

LIMIT=$((64 * 1024 * 1024))
DEST=.device

cargo build --release --lib --examples
# The test binaries: the compiler-artifact messages of test targets carry their path.
cargo test --release --no-run --message-format=json >target/gpu-pack-tests.json

rm -rf "$DEST"
mkdir -p "$DEST/tests" "$DEST/python"

python3 - target/gpu-pack-tests.json "$DEST/tests" <<'EOF'
import json, shutil, sys, os
messages, dest = sys.argv[1], sys.argv[2]
seen = {}
for line in open(messages):
    if not line.startswith("{"):
        continue
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg["profile"]["test"]:
        continue  # examples built alongside; the demo is copied below
    target = msg["target"]
    lib_kinds = {"lib", "rlib", "cdylib", "staticlib", "dylib"}
    name = "lib" if lib_kinds & set(target["kind"]) else target["name"]
    if name in seen and seen[name] != msg["executable"]:
        sys.exit(f"two test binaries named {name}: {seen[name]} and {msg['executable']}")
    seen[name] = msg["executable"]
    shutil.copy2(msg["executable"], os.path.join(dest, name))
if "cuda" not in seen:
    sys.exit("no test binary for tests/cuda.rs among the artifacts")
print("test binaries:", " ".join(sorted(seen)))
EOF

cp target/release/libfusedmoe.so* "$DEST/"
cp target/release/examples/demo target/release/examples/bench target/release/examples/tune "$DEST/"
cp examples/python/*.py examples/python/pytest.ini "$DEST/python/"
cp tests/gpu/check.sh "$DEST/"

if command -v strip >/dev/null 2>&1; then
  strip --strip-debug "$DEST"/tests/* "$DEST/demo" "$DEST/bench" "$DEST/tune" "$DEST/libfusedmoe.so"
else
  echo "warning: no strip here; the binaries keep their debug info" >&2
fi

total=$(du -sb "$DEST" | cut -f1)
du -sh "$DEST"/libfusedmoe.so "$DEST"/demo "$DEST"/bench "$DEST"/tune "$DEST"/tests/* | sed 's/^/  /'
echo "total: $total bytes ($((total / 1024 / 1024)) MiB) in $DEST"
if [ "$total" -gt "$LIMIT" ]; then
  echo "error: $DEST is over 64 MiB, the most a run carries" >&2
  exit 1
fi
