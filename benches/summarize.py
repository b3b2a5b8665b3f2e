#!/usr/bin/env python3
"""Prints criterion's medians as a Markdown table with ratios.

Usage: python3 benches/summarize.py CRITERION_DIR GROUP BASELINE_NAME
e.g.   python3 benches/summarize.py target/criterion one_call 2_set_header
"""
import json
import pathlib
import sys

root, group, baseline = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
medians = {}
for est in sorted((root / group).glob("*/new/estimates.json")):
    data = json.loads(est.read_text())
    medians[est.parent.parent.name] = data["median"]["point_estimate"]
base = medians.get(baseline)
print(f"| {group} | median ns | × {baseline} |")
print("| --- | ---: | ---: |")
for name, ns in medians.items():
    ratio = f"{ns / base:.2f}" if base else "n/a"
    print(f"| {name} | {ns:.1f} | {ratio} |")
