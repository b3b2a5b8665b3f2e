#!/usr/bin/env python3
"""Runs the hot-path benchmark several times and prints each bar's ratio per run and its
median across runs.

One criterion run on a shared machine moves by several percent from one process to the
next (address-space layout, neighbours), which is as much as a 1.10x bar allows; the median
of per-run ratios is steadier than any single run. Each ratio is taken within one run.

Usage: python3 benches/rounds.py [RUNS] [GROUP]
e.g.   python3 benches/rounds.py 5 one_call      # about 2.5 minutes on a 2-core machine
       python3 benches/rounds.py 5 two_threads
"""
import json
import pathlib
import statistics
import subprocess
import sys

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
GROUP = sys.argv[2] if len(sys.argv) > 2 else "one_call"
ROOT = pathlib.Path("target/criterion") / GROUP

# (label, numerator, denominator, bar): the ratios the benchmark issue sets bars on.
BARS = [
    ("(3) / (2)", "3_auth_layer", "2_set_header", "<= 1.10"),
    ("(4) / (7)", "4_full_stack", "7_retry_clone_set_header", "<= 1.10"),
    ("(3) / (5a)", "3_auth_layer", "5a_rwlock_layer", "< 1"),
    ("(3) / (5b)", "3_auth_layer", "5b_mutex_layer", "< 1"),
    ("(4) / (5a)", "4_full_stack", "5a_rwlock_layer", "< 1"),
    ("(4) / (5b)", "4_full_stack", "5b_mutex_layer", "< 1"),
    ("(7) / (5a)", "7_retry_clone_set_header", "5a_rwlock_layer", "(context)"),
]


def medians():
    out = {}
    for est in ROOT.glob("*/new/estimates.json"):
        out[est.parent.parent.name] = json.loads(est.read_text())["median"]["point_estimate"]
    return out


runs = []
for i in range(RUNS):
    subprocess.run(
        ["cargo", "bench", "--bench", "hot_path", "--", f"^{GROUP}/"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    runs.append(medians())
    print(f"run {i + 1}/{RUNS} done", file=sys.stderr)

names = sorted(runs[0])
print(f"`python3 benches/rounds.py {RUNS} {GROUP}`: median ns per run, and the median of runs")
print()
print("| variant | " + " | ".join(f"run {i + 1}" for i in range(RUNS)) + " | median |")
print("| --- |" + " ---: |" * (RUNS + 1))
for name in names:
    values = [r[name] for r in runs if name in r]
    cells = " | ".join(f"{v:.1f}" for v in values)
    print(f"| {name} | {cells} | {statistics.median(values):.1f} |")
print()
print("| ratio (same run) | " + " | ".join(f"run {i + 1}" for i in range(RUNS)) + " | median | bar |")
print("| --- |" + " ---: |" * (RUNS + 1) + " --- |")
for label, num, den, bar in BARS:
    ratios = [r[num] / r[den] for r in runs if num in r and den in r]
    if not ratios:
        continue
    cells = " | ".join(f"{x:.3f}" for x in ratios)
    print(f"| {label} | {cells} | **{statistics.median(ratios):.3f}** | {bar} |")
