#!/usr/bin/env python3
"""Counts the instructions one call of each hot-path variant executes, with valgrind's
callgrind, and prints them with the ratios the benchmark issue sets bars on.

Instruction counts are not time (an atomic read-modify-write or a cache miss costs more than
an add), but they are repeatable: the same binary gives the same count whatever else the
machine is doing, where one criterion run here moves by several percent. They show where a
time difference comes from.

Each variant runs under callgrind for one second of criterion's `--profile-time` loop; the
count per call is the inclusive cost of the benchmark's per-call closure
(`hot_path::boxed::{{closure}}`) divided by the number of times it was called.

Needs valgrind (`apt-get install valgrind`). About 15 seconds on a 2-core machine, once the
bench binary is built.

Usage: python3 benches/instructions.py
"""
import collections
import concurrent.futures
import json
import re
import subprocess
import sys
import tempfile
import pathlib

VARIANTS = [
    "1_no_layer",
    "2_set_header",
    "3_auth_layer",
    "4_full_stack",
    "4t_tower_retry_stack",
    "5a_rwlock_layer",
    "5b_mutex_layer",
    "6_floor_swap_clock",
    "7_retry_clone_set_header",
]
RATIOS = [
    ("(3) / (2)", "3_auth_layer", "2_set_header"),
    ("(4) / (7)", "4_full_stack", "7_retry_clone_set_header"),
    ("(3) / (5a)", "3_auth_layer", "5a_rwlock_layer"),
    ("(4) / (5a)", "4_full_stack", "5a_rwlock_layer"),
    ("(4) / (5b)", "4_full_stack", "5b_mutex_layer"),
    ("(4) / (4t)", "4_full_stack", "4t_tower_retry_stack"),
    ("(3) / (6)", "3_auth_layer", "6_floor_swap_clock"),
    ("(6) / (2)", "6_floor_swap_clock", "2_set_header"),
]
CALLER = "hot_path::boxed::{{closure}}"


def bench_binary():
    out = subprocess.run(
        [
            "cargo", "bench", "-p", "genesys-auth-benches", "--bench", "hot_path",
            "--no-run", "--message-format=json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            if msg["target"]["name"] == "hot_path":
                return msg["executable"]
    sys.exit("hot_path bench binary not found")


def per_call(path):
    """Inclusive instructions per call of the per-call closure, from a callgrind file.

    Callgrind names a function once as `cfn=(id) name` and later as `cfn=(id)`; a
    `calls=N ...` line after it is followed by a line whose second field is the inclusive
    cost of those N calls."""
    names, calls, cost = {}, collections.Counter(), collections.Counter()
    callee, pending = None, None
    for line in open(path, errors="replace"):
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            kind, ident, name = m.groups()
            if name:
                names[ident] = name
            if kind == "cfn":
                callee = ident
            continue
        m = re.match(r"^calls=(\d+)", line)
        if m:
            pending = int(m.group(1))
            continue
        if pending is not None:
            fields = line.split()
            if len(fields) >= 2:
                calls[callee] += pending
                cost[callee] += int(fields[1])
            pending = None
    for ident, name in names.items():
        if name == CALLER and calls[ident]:
            return cost[ident] / calls[ident], calls[ident]
    sys.exit(f"{CALLER} not found in {path}")


def measure(binary, variant, workdir):
    out = pathlib.Path(workdir) / f"{variant}.callgrind"
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            binary,
            "--bench",
            "--profile-time",
            "1",
            f"^one_call/{variant}$",
        ],
        check=True,
        capture_output=True,
    )
    return variant, per_call(out)


def main():
    binary = bench_binary()
    with tempfile.TemporaryDirectory() as workdir:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            results = dict(pool.map(lambda v: measure(binary, v, workdir), VARIANTS))
    print("`python3 benches/instructions.py`: instructions per call (callgrind)\n")
    print("| variant | instructions per call | × 2_set_header | calls counted |")
    print("| --- | ---: | ---: | ---: |")
    base = results["2_set_header"][0]
    for variant in VARIANTS:
        count, n = results[variant]
        print(f"| {variant} | {count:,.0f} | {count / base:.3f} | {n:,} |")
    print("\n| ratio | instructions |")
    print("| --- | ---: |")
    for label, num, den in RATIOS:
        print(f"| {label} | {results[num][0] / results[den][0]:.3f} |")


if __name__ == "__main__":
    main()
