#!/usr/bin/env bash
# Registers, stack, shared and local memory of every kernel the library compiled, from the
# cubins in its kernel cache: what the GPU machine's NVRTC made of them (a CUDA 13.0 NVRTC gave
# the LoRA shrink 172 registers where this machine's 13.5 nvcc and NVRTC gave 140, so check on
# the machine that runs them). After any run there, from the repository root:
#
#   bash tests/gpu/kernel_regs.sh [CACHE_DIR] [REGEX]     e.g. /tmp/fc moe_lora
#
# CACHE_DIR defaults to $FUSEDMOE_CACHE_DIR, else /tmp/fusedmoe-cache; a cubin is named
# <variant>-<arch>-<hash>.cubin (src/backend/cuda/cache.rs). Needs cuobjdump (CUDA toolkit).
set -uo pipefail
dir=${1:-${FUSEDMOE_CACHE_DIR:-/tmp/fusedmoe-cache}}
regex=${2:-.}
cuobjdump=$(command -v cuobjdump || ls /usr/local/cuda*/bin/cuobjdump 2>/dev/null | head -n 1)
[ -n "$cuobjdump" ] || { echo "error: no cuobjdump" >&2; exit 1; }
shopt -s nullglob
cubins=("$dir"/*.cubin)
[ ${#cubins[@]} -gt 0 ] || { echo "error: no cubins in $dir" >&2; exit 1; }
printf '| cubin | function | registers | stack | shared | local |\n|---|---|---|---|---|---|\n'
for f in "${cubins[@]}"; do
  name=$(basename "$f" .cubin)
  [[ $name =~ $regex ]] || continue
  "$cuobjdump" --dump-resource-usage "$f" 2>/dev/null | awk -v n="${name%-*}" '
    /Function / { fn = $2; sub(/:$/, "", fn) }
    /REG:/ {
      for (i = 1; i <= NF; ++i) { split($i, kv, ":"); v[kv[1]] = kv[2] }
      printf "| %s | %s | %s | %s | %s | %s |\n", n, fn, v["REG"], v["STACK"], v["SHARED"], v["LOCAL"]
    }'
done
