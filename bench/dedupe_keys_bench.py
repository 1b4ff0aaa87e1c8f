#!/usr/bin/env python3
"""The transform's dedupe key set at 5M, 20M and 50M keys: peak RSS, lookup
rates and snapshot costs with a memory budget (keys beyond it spill to sorted
runs on local disk) beside the same set without one (every key in memory,
the transform before budgets) in the same run.

    python3 bench/dedupe_keys_bench.py [--keys 5000000,20000000,50000000] [--budget 67108864]

Each configuration runs in its own process (the `dedupe_keys` bench target,
release build) so its peak RSS (VmHWM) is its own. Appends a section to
docs/benchmarks.md.
"""

import argparse
import json
import os
import subprocess
import tempfile
import time

from harness import append_results

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def bench_binary():
    out = subprocess.run(
        ["cargo", "bench", "--workspace", "--bench", "dedupe_keys", "--no-run", "--message-format", "json"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "dedupe_keys" and m.get("executable"):
            return m["executable"]
    raise SystemExit("dedupe_keys bench target not built")


def run(binary, keys, budget):
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([binary, str(keys), budget, work], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", default="5000000,20000000,50000000")
    ap.add_argument("--budget", default=str(64 << 20), help="bytes of memory for in-memory keys")
    a = ap.parse_args()
    binary = bench_binary()
    rows = []
    for n in [int(k) for k in a.keys.split(",")]:
        for budget in [a.budget, "unbounded"]:
            r = run(binary, n, budget)
            print(json.dumps(r), flush=True)
            rows.append(r)
    mib = int(a.budget) / (1 << 20)
    text = [f"\n## Dedupe keys beyond memory ({time.strftime('%Y-%m-%d')}, release, `bench/dedupe_keys_bench.py`)\n",
            f"The key set alone, {mib:.0f} MiB budget beside no budget (every key in memory) in the same run; "
            "keys arrive in commits of 20,000, each looked up first; 1M duplicate and 1M absent lookups after. "
            "Peak RSS is the process's VmHWM before the reload.\n",
            "| keys | budget | in memory | runs | peak RSS MiB | insert keys/s | duplicate lookups/s | absent lookups/s | snapshot s | reload s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = f"{mib:.0f} MiB" if r["budget"] else "none"
        text.append(f"| {r['keys']:,} | {b} | {r['in_memory_keys']:,} | {r['runs']} | {r['peak_rss_mib']:,.0f} | "
                    f"{r['insert_keys_per_s']:,.0f} | {r['duplicate_lookups_per_s']:,.0f} | {r['absent_lookups_per_s']:,.0f} | "
                    f"{r['snapshot_s']:.2f} | {r['load_s']:.2f} |")
    pairs = {}
    for r in rows:
        pairs.setdefault(r["keys"], {})["budget" if r["budget"] else "none"] = r
    text.append("")
    for n, p in pairs.items():
        if "budget" in p and "none" in p:
            text.append(f"- {n:,} keys: peak RSS {p['budget']['peak_rss_mib']:,.0f} vs {p['none']['peak_rss_mib']:,.0f} MiB "
                        f"({p['budget']['peak_rss_mib'] / p['none']['peak_rss_mib']:.2f}×); insert rate "
                        f"{p['budget']['insert_keys_per_s'] / p['none']['insert_keys_per_s']:.2f}× of the unbounded set's.")
    append_results("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
