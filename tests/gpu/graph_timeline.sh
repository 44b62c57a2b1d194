#!/usr/bin/env bash
# Where a graph replay's time goes, kernel by kernel: nsys traces every node of the bench's
# CUDA graphs (--cuda-graph-trace=node; without nsys, torch's profiler traces
# bench_torch.py's graphs, torch_timeline.py), then tests/gpu/graph_timeline.py prints, per shape
# and position in the replay (align, GEMM1, GEMM2, combine), the median start, end and
# duration relative to the replay's first kernel, and the gaps between them. ncu times
# kernels alone with cold caches at base clocks; this sees them as they overlap in the graph.
# On the GPU machine, from the repository root:
#
#   bash tests/gpu/graph_timeline.sh OUTDIR [bench args...]
#   e.g. bash tests/gpu/graph_timeline.sh $OUT/timeline --shapes qwen3 --tokens 1
set -uo pipefail
[ $# -ge 1 ] || { sed -n 2,10p "$0"; exit 2; }
out=$1
shift
mkdir -p "$out"
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys \
  /usr/local/cuda*/nsight-systems*/bin/nsys 2>/dev/null | head -n 1)
if [ -z "$nsys" ]; then
  # the device tool's H100 has torch but no nsys: torch's profiler (CUPTI) sees the same
  echo "no nsys on this machine: torch's profiler instead (tests/gpu/torch_timeline.py)"
  python3 "$(dirname "$0")/torch_timeline.py" "$out" "$@" >"$out/bench.log" 2>&1 ||
    { echo "torch_timeline.py failed"; tail -n 20 "$out/bench.log"; exit 1; }
  python3 "$(dirname "$0")/graph_timeline.py" "$out"/trace_cuda_gpu_trace.csv | tee "$out/timeline.txt"
  exit
fi
"$nsys" --version
"$nsys" profile --cuda-graph-trace=node --trace=cuda --sample=none --cpuctxsw=none \
  --force-overwrite=true -o "$out/trace" .device/bench "$@" >"$out/bench.log" 2>&1 ||
  { echo "nsys profile failed"; tail -n 20 "$out/bench.log"; exit 1; }
"$nsys" stats --report cuda_gpu_trace --format csv --force-export=true \
  --output "$out/trace" "$out/trace.nsys-rep" >"$out/stats.log" 2>&1 ||
  { echo "nsys stats failed"; tail -n 20 "$out/stats.log"; exit 1; }
python3 "$(dirname "$0")/graph_timeline.py" "$out"/trace_cuda_gpu_trace.csv | tee "$out/timeline.txt"
