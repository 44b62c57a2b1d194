"""Summarises nsys's cuda_gpu_trace CSV of a bench run (tests/gpu/graph_timeline.sh).

A replay of moe_prepare + moe_run starts with an align kernel; its kernels run until the next
align. Replays are grouped by what they launch (kernel names and grids, so shapes and token
counts fall apart), and for each group the median start, duration and end of every kernel,
in microseconds from the replay's first kernel start, are printed, with the median span.
"""

import csv
import statistics
import sys


def column(header, *words):
    for i, name in enumerate(header):
        if all(w in name for w in words):
            return i
    sys.exit(f"no column with {words} in {header}")


def short(name):
    name = name.split("(")[0]
    return name.split("__")[0] if name.startswith("moe_align") else name


def main(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0], rows[1:]
    start, dur = column(header, "Start"), column(header, "Duration")
    name, grid = column(header, "Name"), column(header, "GrdX")
    grid_y = column(header, "GrdY")
    kernels = []
    for r in rows:
        if len(r) <= max(start, dur, name, grid) or not r[grid].strip():
            continue  # a copy or a memset
        kernels.append((int(r[start]), int(r[dur]), short(r[name]), f"{r[grid]}x{r[grid_y]}"))
    kernels.sort()
    replays, current = [], []
    for k in kernels:
        if k[2].startswith("moe_align") and current and not current[-1][2].startswith("moe_align"):
            replays.append(current)
            current = []
        current.append(k)
    if current:
        replays.append(current)
    groups = {}
    for rep in replays:
        key = tuple((k[2], k[3]) for k in rep)
        groups.setdefault(key, []).append(rep)
    for key, reps in sorted(groups.items(), key=lambda kv: kv[1][0][0][0]):
        if len(reps) < 5:
            continue
        t0s = [rep[0][0] for rep in reps]
        span = statistics.median((rep[-1][0] + rep[-1][1] - rep[0][0]) / 1e3 for rep in reps)
        print(f"\n{len(reps)} replays, median span {span:.1f} us:")
        print(f"  {'kernel':<28} {'grid':>10} {'start':>7} {'dur':>7} {'end':>7} {'gap':>6}")
        prev_end = None
        for i, (kname, kgrid) in enumerate(key):
            st = statistics.median((rep[i][0] - t0) / 1e3 for rep, t0 in zip(reps, t0s))
            du = statistics.median(rep[i][1] / 1e3 for rep in reps)
            en = statistics.median((rep[i][0] + rep[i][1] - t0) / 1e3 for rep, t0 in zip(reps, t0s))
            gap = "" if prev_end is None else f"{st - prev_end:6.1f}"
            print(f"  {kname:<28} {kgrid:>10} {st:7.1f} {du:7.1f} {en:7.1f} {gap:>6}")
            prev_end = en


if __name__ == "__main__":
    main(sys.argv[1])
