#!/usr/bin/env python3
"""Cost of tracing on ingest throughput, measured in one run:

    python3 bench/tracing_overhead.py [--events 50000] [--binary ~/.cache/medallion-target/release/medallion-ingest]

Publishes --events messages (one 200-byte event each, every one with its own
`traceparent`) to a fresh ingest for each setting: tracing disabled
(OTEL_SDK_DISABLED=true), sampler traceidratio 1.0 and 0.01, exporting over
OTLP HTTP to a receiver in this script (which only counts the bytes). Times
publish start → all rows in Bronze. Appends to docs/benchmarks.md.
"""

import argparse
import asyncio
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import deltalake
import pyarrow
import nats

from harness import append_results, free_port, start_nats

received = {"requests": 0, "bytes": 0}


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        received["requests"] += 1
        received["bytes"] += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def bronze_rows(lake):
    path = os.path.join(lake, "bronze", "bench", "traced")
    if not os.path.isdir(os.path.join(path, "_delta_log")):
        return 0
    return sum(pyarrow.table(deltalake.DeltaTable(path).get_add_actions(flatten=True)).column("num_records").to_pylist())


async def one(args, name, otel_env):
    tmp = tempfile.mkdtemp()
    server, url = start_nats(tmp)
    lake = os.path.join(tmp, "lake")
    env = dict(os.environ, NATS_URL=url, MEDALLION_LAKE=lake, MEDALLION_LOG="warn",
               MEDALLION_INGEST_ADDR=f"127.0.0.1:{free_port()}", **otel_env)
    ingest = subprocess.Popen([os.path.expanduser(args.binary)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    nc = await nats.connect(url)
    js = nc.jetstream()
    before = dict(received)
    try:
        body = b'{"event_id":"e","ts":"2026-11-29T10:00:00Z","amount":1.0,"currency":"EUR","country":"FR"}'.ljust(200)
        start = time.perf_counter()
        pending = []
        for i in range(args.events):
            h = {"traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"}
            pending.append(asyncio.ensure_future(js.publish("medallion.ingest.bench.traced", body, headers=h)))
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        while bronze_rows(lake) < args.events:
            await asyncio.sleep(0.1)
        took = time.perf_counter() - start
        time.sleep(2)  # let the exporter flush what it batched
    finally:
        await nc.close()
        ingest.terminate()
        ingest.wait()
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return name, args.events / took, received["bytes"] - before["bytes"]


async def run(args):
    rport = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", rport), Receiver)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{rport}", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    settings = [
        ("disabled", {"OTEL_SDK_DISABLED": "true"}),
        ("traceidratio 1.0", {**otlp, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0"}),
        ("traceidratio 0.01", {**otlp, "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}),
    ]
    rows = []
    for _ in range(args.rounds):
        for name, env in settings:
            rows.append(await one(args, name, env))
    best = {}
    for name, rate, exported in rows:
        b = best.get(name)
        if b is None or rate > b[0]:
            best[name] = (rate, exported)
    base = best["disabled"][0]
    out = ["", f"### Tracing overhead on ingest ({time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`)", "",
           f"{args.events:,} messages of one event, each with its own `traceparent`; best of {args.rounds} per setting.", "",
           "| setting | ingest ev/s | vs disabled | OTLP bytes exported |", "|---|---|---|---|"]
    for name, (rate, exported) in best.items():
        out.append(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {exported:,} |")
    append_results("\n".join(out) + "\n")
    httpd.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--binary", default="~/.cache/medallion-target/release/medallion-ingest")
    asyncio.run(run(ap.parse_args()))
