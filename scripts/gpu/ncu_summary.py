#!/usr/bin/env python3
"""Summarises `ncu --csv --metrics gpu__time_duration.sum` output: per kernel name and
grid, how many launches and the mean duration, sorted by total time."""
import csv
import sys
from collections import defaultdict

rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"'))]
agg = defaultdict(list)
for r in rows:
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    unit = r.get("Metric Unit", "nsecond")
    v = float(r["Metric Value"].replace(",", ""))
    us = v / 1000 if unit == "nsecond" else v * 1000 if unit == "msecond" else v
    agg[(r["Kernel Name"][:40], r.get("Grid Size", ""), r.get("Block Size", ""))].append(us)
total = sum(sum(v) for v in agg.values())
print(f"{'kernel':40} {'grid':>16} {'block':>12} {'n':>5} {'mean us':>9} {'share':>6}")
for (name, grid, block), v in sorted(agg.items(), key=lambda kv: -sum(kv[1]))[:40]:
    print(f"{name:40} {grid:>16} {block:>12} {len(v):>5} {sum(v)/len(v):>9.2f} {100*sum(v)/total:>5.1f}%")
print(f"total {total:.0f} us over {sum(len(v) for v in agg.values())} launches")
