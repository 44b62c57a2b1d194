"""Graph replays of moe_prepare + moe_run under torch's profiler (CUPTI), for machines
without nsys: the kernels of each replay with their device start and duration, written as
the CSV that graph_timeline.py summarises (tests/gpu/graph_timeline.sh calls this).

    python3 tests/gpu/torch_timeline.py OUTDIR [bench_torch.py's --shapes, --tokens]

The shapes, weights, routing and input sets are examples/python/bench_torch.py's; for each
shape and M, one graph per input set is captured and replayed REPLAYS times, then those
replays are profiled.
"""

import csv
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "examples", "python"))
import bench_torch as bt  # noqa: E402

REPLAYS = 200


def kernels_of(trace_path):
    """(start ns, duration ns, name, grid x, grid y) of every kernel in a chrome trace."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    found = []
    for e in events:
        if e.get("cat") != "kernel":
            continue
        grid = e.get("args", {}).get("grid", [0, 0, 0])
        found.append((round(e["ts"] * 1e3), round(e["dur"] * 1e3), e["name"], grid[0], grid[1]))
    return found


def main(argv):
    out, opts = argv[0], bt.parse_args(argv[1:])
    os.makedirs(out, exist_ok=True)
    bt.load()
    torch = bt.torch
    gpu = bt.Gpu(opts)
    rows = []
    with torch.cuda.stream(gpu.stream):
        for m in opts.models:
            w = bt.Weights(gpu, m, seed=7)
            layer = bt.make_layer(gpu, m, w)
            ws = torch.empty(layer.workspace_size(max(opts.tokens)), dtype=torch.uint8,
                             device=gpu.device)
            layer.warmup(max(opts.tokens), gpu.handle)
            for tokens in opts.tokens:
                n = bt.set_count(m.set_bytes(tokens))
                gen = torch.Generator(device=gpu.device)
                gen.manual_seed(1000 + tokens)
                sets = [bt.InputSet(gpu, m, layer, gen, tokens) for _ in range(n)]

                def ours(i):
                    s = sets[i]
                    s.plan.prepare(s.ids32, ws, gpu.handle)
                    s.plan.run(s.hidden, s.weights, s.out, gpu.handle)

                graphs = [c[0] for c in gpu.capture(n, ours)]
                for i in range(REPLAYS):
                    graphs[i % n].replay()
                gpu.sync()
                activities = [torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=activities) as prof:
                    for i in range(REPLAYS):
                        graphs[i % n].replay()
                    gpu.sync()
                trace = os.path.join(out, "%s_m%d.json" % (m.name, tokens))
                prof.export_chrome_trace(trace)
                found = kernels_of(trace)
                print("%s M=%d: %d kernels traced" % (m.name, tokens, len(found)))
                rows.extend(found)
                graphs = None
            layer.close()
            del layer, ws, w
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    with open(os.path.join(out, "trace_cuda_gpu_trace.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Start (ns)", "Duration (ns)", "GrdX", "GrdY", "Name"])
        writer.writerows((r[0], r[1], r[3], r[4], r[2]) for r in sorted(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
