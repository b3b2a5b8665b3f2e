#!/usr/bin/env python3
"""Runs the hot-path benchmark several times and prints each bar's ratio per run and its
median across runs.

One criterion run on a shared machine moves by several percent from one process to the
next (address-space layout, neighbours), which is a good part of what a bar allows; the median
of per-run ratios is steadier than any single run. Each ratio is taken within one run.

With GROUP `paired`, each run is one process of the bench's `--paired` mode (every variant
interleaved in short batches, 1,000 rounds), and the table shows each run's median
per-call time and per-round ratio: the process's memory layout still moves a ratio by a
few percent from one process to the next, which several runs show.

With GROUP `users`, each run is one process of `users_cost` (issue #15: a request for a
cached user beside a client-credentials one, interleaved the same way, 400 rounds).

Usage: python3 benches/rounds.py [RUNS] [GROUP]
e.g.   python3 benches/rounds.py 5 one_call      # about 2.5 minutes on a 2-core machine
       python3 benches/rounds.py 5 two_threads
       python3 benches/rounds.py 9 paired        # about 1 minute
       python3 benches/rounds.py 7 users         # about 2 minutes
"""
import json
import pathlib
import re
import statistics
import subprocess
import sys

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
GROUP = sys.argv[2] if len(sys.argv) > 2 else "one_call"
ROOT = pathlib.Path("target/criterion") / GROUP

# (label, numerator, denominator, bar): the ratios the benchmark issue sets bars on.
BARS = [
    ("(3) / (2)", "3_auth_layer", "2_set_header", "<= 1.40"),
    ("(4) / (7)", "4_full_stack", "7_retry_clone_set_header", "<= 1.20"),
    ("(3) / (5a)", "3_auth_layer", "5a_rwlock_layer", "< 1"),
    ("(3) / (5b)", "3_auth_layer", "5b_mutex_layer", "< 1"),
    ("(4) / (5a)", "4_full_stack", "5a_rwlock_layer", "< 1"),
    ("(4) / (5b)", "4_full_stack", "5b_mutex_layer", "< 1"),
    ("(7) / (5a)", "7_retry_clone_set_header", "5a_rwlock_layer", "(context)"),
    ("(4t) / (7)", "4t_tower_retry_stack", "7_retry_clone_set_header", "(context)"),
    ("(4) / (4t)", "4_full_stack", "4t_tower_retry_stack", "(context)"),
    ("(3) / (6)", "3_auth_layer", "6_floor_swap_clock", "(context)"),
    ("(6) / (2)", "6_floor_swap_clock", "2_set_header", "(context)"),
]


# users_cost's ratios (its own labels), for GROUP `users`.
USER_BARS = [
    ("user_1 / cc_auth_layer", "<= 1.5"),
    ("user_100k_same / cc_auth_layer", "<= 1.5"),
    ("user_layers_1 / cc_auth_layers", "(context: with replay, like for like)"),
    ("user_1 / cc_auth_layer_keyed", "(context: finding the user)"),
    ("user_layers_1 / cc_auth_layers_keyed", "(context: finding the user)"),
    ("cc_auth_layer_keyed / cc_auth_layer", "(context: the key in the request)"),
    ("cc_auth_layers / cc_auth_layer", "(context)"),
    ("user_100k_spread / cc_auth_layer", "(context: a cold entry each call)"),
    ("user_100k_spread / user_1", "(context)"),
    ("user_1_store / user_1", "(context: a fleet's cache hit, #16)"),
]


def users():
    """One process of `users_cost`: its median ns per variant, and its median ratios."""
    out = subprocess.run(
        ["cargo", "bench", "-p", "genesys-auth-benches", "--bench", "users_cost"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    times, ratios = {}, {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.match(r"^\d", cells[2]):
            times[cells[0]] = float(cells[2])
        elif len(cells) == 9 and cells[4].startswith("**"):
            ratios[cells[0]] = float(cells[4].strip("*"))
    return times, ratios


def medians():
    out = {}
    for est in ROOT.glob("*/new/estimates.json"):
        out[est.parent.parent.name] = json.loads(est.read_text())["median"]["point_estimate"]
    return out


def paired():
    """One process of `--paired`: its median ns per variant, and its median ratios."""
    out = subprocess.run(
        ["cargo", "bench", "-p", "genesys-auth-benches", "--bench", "hot_path", "--", "--paired", "1000"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    times, ratios = {}, {}
    for line in out.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.match(r"^\d", cells[0]):
            times[cells[0]] = float(cells[2])
        elif len(cells) == 5 and cells[0].startswith("("):
            ratios[cells[0]] = float(cells[2])
    return times, ratios


runs, paired_ratios = [], []
for i in range(RUNS):
    if GROUP in ("paired", "users"):
        times, ratios = paired() if GROUP == "paired" else users()
        runs.append(times)
        paired_ratios.append(ratios)
    else:
        subprocess.run(
            ["cargo", "bench", "-p", "genesys-auth-benches", "--bench", "hot_path", "--", f"^{GROUP}/"],
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
bars = [(label, None, None, bar) for label, bar in USER_BARS] if GROUP == "users" else BARS
for label, num, den, bar in bars:
    if GROUP in ("paired", "users"):
        # The median of the per-round ratios within each process, not a ratio of medians.
        ratios = [r[label] for r in paired_ratios if label in r]
    else:
        ratios = [r[num] / r[den] for r in runs if num in r and den in r]
    if not ratios:
        continue
    cells = " | ".join(f"{x:.3f}" for x in ratios)
    print(f"| {label} | {cells} | **{statistics.median(ratios):.3f}** | {bar} |")
