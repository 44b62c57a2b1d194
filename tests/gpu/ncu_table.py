#!/usr/bin/env python3
"""Summarizes an ncu raw-page CSV (tests/gpu/ncu_kernels.sh) as a markdown table.

    python3 tests/gpu/ncu_table.py profile.csv

Per profiled kernel: its name, grid, block, registers per thread, duration (µs), DRAM and SM
throughput (% of peak), achieved occupancy (% of the warps an SM holds), and the three warp
stall reasons with the most cycles per issued instruction. The application's own output,
mixed into ncu's stdout, is skipped: the table starts at ncu's header row. Standard library only.
"""
import csv
import re
import sys

# (title, metric names in the order tried: ncu versions name some differently, scale)
COLUMNS = [
    ("µs", ("gpu__time_duration.sum",), 1e-3),  # ns
    (
        "DRAM %",
        (
            "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",  # ncu of CUDA 13.0
            "dram__throughput.avg.pct_of_peak_sustained_elapsed",
        ),
        1,
    ),
    ("SM %", ("sm__throughput.avg.pct_of_peak_sustained_elapsed",), 1),
    ("occupancy %", ("sm__warps_active.avg.pct_of_peak_sustained_active",), 1),
]
# WarpStateStats' cycles per issued instruction, by reason (one family; the first found)
STALL_FAMILIES = [
    re.compile(r"^smsp__average_warp_latency_issue_stalled_(\w+)\.ratio$"),
    re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$"),
    re.compile(r"^smsp__pcsamp_warps_issue_stalled_(\w+)$"),
]


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def rows(path):
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    table = list(csv.reader(lines))
    if not table or table[0][0] != "ID":
        sys.exit(f"{path}: no ncu CSV header (was ncu run with --csv --page raw?)")
    header, body = table[0], table[1:]
    # the row after the header gives the units
    if body and not number(body[0][0] or "x"):
        body = body[1:]
    return header, body


def stall_columns(header):
    for family in STALL_FAMILIES:
        found = [(i, m.group(1)) for i, h in enumerate(header) if (m := family.match(h))]
        found = [(i, name) for i, name in found if name not in ("not_selected", "selected")]
        if found:
            return found
    return []


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    header, body = rows(sys.argv[1])
    at = {h: i for i, h in enumerate(header)}
    stalls = stall_columns(header)
    print("| # | kernel | grid | block | regs | " + " | ".join(c[0] for c in COLUMNS) + " | top stalls |")
    print("|---|---|---|---|---|" + "---|" * len(COLUMNS) + "---|")
    for r in body:
        def get(names, scale=1):
            for name in (names,) if isinstance(names, str) else names:
                i = at.get(name)
                v = number(r[i]) if i is not None else None
                if v is not None:
                    return f"{v * scale:.1f}"
            return "–"
        ranked = sorted(
            ((number(r[i]) or 0.0, name) for i, name in stalls), reverse=True
        )[:3]
        top = ", ".join(f"{name} {v:.1f}" for v, name in ranked) or "–"
        name = r[at["Kernel Name"]] if "Kernel Name" in at else "?"
        grid = r[at["Grid Size"]] if "Grid Size" in at else "?"
        block = r[at["Block Size"]] if "Block Size" in at else "?"
        print(
            f"| {r[0]} | {name[:48]} | {grid} | {block} | {get('launch__registers_per_thread')} | "
            + " | ".join(get(c[1], c[2]) for c in COLUMNS)
            + f" | {top} |"
        )


if __name__ == "__main__":
    main()
