"""Summarise Nsight Compute's per-instruction source view of one kernel: executed SASS by opcode, the warp stall
reasons, and the instructions where warps were sampled most.

    ncu --kernel-name regex:NAME --launch-skip 1 --launch-count 1 --section SourceCounters \
        --section WarpStateStats --page source --print-source sass --csv python ... > sass.csv
    python benchmarks/ncu_source.py sass.csv [--per N] [--top 25]

`--per N` also prints each opcode's executions divided by N (e.g. the CTAs x warps x pipeline steps of the run:
instructions a warp per step). Session 25 read the fragment kernel this way (pallas_kernels/NOTES.md; the CSV of
that run: benchmarks/results/2026-11-29-h200-s25/S25-3/sass.csv.gz, which this reads as it is)."""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import sys


def read(path):
    """The CSV's instruction rows as dicts (the header is the row that starts with "Address")."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    header = rows[start]
    return header, [dict(zip(header, r)) for r in rows[start + 1:] if len(r) == len(header)]


def number(row, key):
    value = row.get(key, "")
    return float(value) if value not in ("", "-") else 0.0


def opcode(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):  # a predicate
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("csv")
    p.add_argument("--per", type=float, help="divide executions by this (e.g. CTAs x warps x steps)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    header, rows = read(args.csv)
    executed = sum(number(r, "Instructions Executed") for r in rows)
    by_op = collections.Counter()
    for r in rows:
        by_op[opcode(r["Source"])] += number(r, "Instructions Executed")
    print(f"{len(rows)} SASS instructions, {executed:,.0f} warp instructions executed")
    print(f"{'opcode':14s} {'share':>6s} {'executed':>12s}" + ("  per" if args.per else ""))
    for op, n in by_op.most_common(args.top):
        print(f"{op:14s} {n / executed:6.3f} {n:12,.0f}" + (f" {n / args.per:6.1f}" if args.per else ""))
    reasons = [k for k in header if k.startswith("stall_") and "Not Issued" not in k]
    stalls = collections.Counter({k: sum(number(r, k) for r in rows) for k in reasons})
    total = sum(stalls.values()) or 1.0
    print("\nstall reason (all samples)")
    for k, n in stalls.most_common(12):
        print(f"  {k[6:]:20s} {n / total:6.3f}")
    sample = "Warp Stall Sampling (All Samples)"
    print(f"\nmost sampled instructions ({sum(number(r, sample) for r in rows):.0f} samples)")
    for r in sorted(rows, key=lambda r: -number(r, sample))[:args.top]:
        worst = max(reasons, key=lambda k: number(r, k))
        print(f"  {number(r, sample):5.0f} {worst[6:]:14s} {r['Source'].strip()[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
