#!/usr/bin/env python3
"""Compares bench runs of two or more builds or option sets (an A/B), from bench's --json files.

    python3 tests/gpu/ab_table.py base=run1_base.json,run2_base.json new=run1_new.json,run2_new.json

Each argument is LABEL=FILE[,FILE...]: the rounds of one variant, interleaved with the other
variants' rounds in one machine session (run-to-run noise between machine starts is larger
than most of the changes judged). Per (shape, M), a variant's time is its best median over its
rounds; the table gives each variant's µs and its ratio to the first label (> 1: faster than
the first), then the LoRA rows (base and LoRA µs) the same way. Standard library only.
"""
import json
import sys


def load(spec):
    label, _, files = spec.partition("=")
    if not files:
        sys.exit(f"expected LABEL=FILE[,FILE...], got {spec!r}")
    rows, lora = {}, {}
    for path in files.split(","):
        with open(path) as f:
            run = json.load(f)
        for r in run.get("rows") or []:
            key = (r["shape"], r["tokens"])
            rows[key] = min(rows.get(key, float("inf")), r["time_us"])
        for r in run.get("lora") or []:
            key = (r["shape"], r["tokens"])
            base, with_lora = lora.get(key, (float("inf"), float("inf")))
            lora[key] = (min(base, r["base_us"]), min(with_lora, r["lora_us"]))
    return label, rows, lora


def table(labels, keys, value):
    head = ["shape", "M"] + [f"{l} µs" for l in labels] + [f"{l} ×" for l in labels[1:]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key in keys:
        times = [value(i, key) for i in range(len(labels))]
        cells = [key[0], str(key[1])] + [f"{t:.1f}" if t else "–" for t in times]
        cells += [f"{times[0] / t:.3f}" if t and times[0] else "–" for t in times[1:]]
        print("| " + " | ".join(cells) + " |")


def main(args):
    if len(args) < 2:
        sys.exit(__doc__)
    runs = [load(a) for a in args]
    labels = [r[0] for r in runs]
    keys = sorted({k for r in runs for k in r[1]}, key=lambda k: (k[0], k[1]))
    table(labels, keys, lambda i, k: runs[i][1].get(k))
    lora_keys = sorted({k for r in runs for k in r[2]})
    if lora_keys:
        print()
        print("LoRA, µs with LoRA (base in brackets):")
        for k in lora_keys:
            cells = []
            for label, _, lora in runs:
                if k in lora:
                    base, with_lora = lora[k]
                    cells.append(f"{label} {with_lora:.1f} ({base:.1f}, +{100 * (with_lora / base - 1):.1f} %)")
            print(f"- {k[0]} M={k[1]}: " + "; ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
