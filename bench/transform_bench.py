#!/usr/bin/env python3
"""Bronze → Silver alone: the transform stage's rate per core beside DuckDB
doing the same parse + dedupe + filter on one thread, and the transform's
peak RSS per million keys of dedupe state.

    python3 bench/transform_bench.py [--events 1000000,2000000] [--bin-dir ~/.cache/medallion-target/release]

For each size: a fresh nats-server and ingest fill Bronze with the shared
payment events (--lines per message); then the transform starts on the full
backlog and the harness times it until every Bronze record is accounted for,
reading the process's own CPU seconds (/proc/<pid>/stat, so other processes on
the machine do not count against it) and peak RSS (VmHWM). Rows are checked
against the generator's ground truth. DuckDB runs the shared job's Bronze and
Silver steps (job_duckdb.py's SQL: parse, dedupe, filter, write Parquet) with
threads=1 on the same file in the same run, timed by its CPU seconds too. RSS per million keys is the slope between the sizes.
Appends a section to docs/benchmarks.md.
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
import urllib.request

import nats

from harness import append_results, free_port, start_nats
from pipeline_bench import publish, rows

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared", "bench")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def events_file(data, n):
    path = os.path.join(data, f"events-{n}.jsonl")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(SHARED, "gen_events.py"), path, str(n), "42"], check=True)
    return path


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def counter(metrics_url, name, layer):
    total = 0.0
    for line in urllib.request.urlopen(metrics_url).read().decode().splitlines():
        if line.startswith(name + "{") and f'layer="{layer}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def run_size(args, n):
    data = os.path.expanduser(args.data_dir)
    events = events_file(data, n)
    truth = json.load(open(events + ".expected.json"))
    want_silver = truth["unique_event_ids"] - truth["invalid"]
    with open(events, "rb") as f:
        lines = [l for l in f.read().split(b"\n") if l]
    payloads = [b"\n".join(lines[i:i + args.lines]) for i in range(0, len(lines), args.lines)]

    tmp = tempfile.mkdtemp()
    server, url = start_nats(tmp)
    lake = os.path.join(tmp, "lake")
    addrs = {s: free_port() for s in ("ingest", "transform")}
    env = dict(os.environ, NATS_URL=url, MEDALLION_LAKE=lake, MEDALLION_LOG="warn",
               MEDALLION_PRODUCTS=os.path.join(HERE, "products"), MEDALLION_SPEC_SOURCE="folder",
               MEDALLION_INGEST_ADDR=f"127.0.0.1:{addrs['ingest']}",
               MEDALLION_TRANSFORM_ADDR=f"127.0.0.1:{addrs['transform']}")
    bins = os.path.expanduser(args.bin_dir)
    start = lambda s: subprocess.Popen([os.path.join(bins, f"medallion-{s}")], env=env,
                                       stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, f"{s}.log"), "w"))
    procs = [start("ingest")]
    try:
        time.sleep(1.5)
        nc = await nats.connect(url)
        await publish(nc.jetstream(), "medallion.ingest.bench.payments", payloads)
        await nc.close()
        while rows(lake, "bronze", "payments") < len(payloads):
            await asyncio.sleep(0.25)

        t = start("transform")
        procs.append(t)
        metrics = f"http://127.0.0.1:{addrs['transform']}/metrics"
        t0 = time.perf_counter()
        deadline = t0 + args.timeout
        while True:
            try:
                if counter(metrics, "medallion_rows_in_total", "silver") >= n:
                    break
            except OSError:
                pass  # not listening yet
            if time.perf_counter() > deadline:
                raise SystemExit(f"transform did not finish {n} rows in {args.timeout}s")
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(t.pid)
        rss = peak_rss_mib(t.pid)
        silver = rows(lake, "silver", "payments")
        quarantine = rows(lake, "silver", "payments__quarantine")
        assert silver == want_silver, (silver, want_silver)
        assert quarantine == truth["invalid"], (quarantine, truth["invalid"])
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"events": n, "wall_s": wall, "cpu_s": cpu, "rss_mib": rss, "silver": silver,
            "quarantine": quarantine, "keys": silver}


def duckdb_one_thread(events):
    """The shared job's Bronze + Silver steps (job_duckdb.py's SQL), on one
    thread, timed by wall clock and by this process's CPU seconds: CPU time is
    what compares fairly with the transform's while other work shares the machine."""
    import duckdb
    out = tempfile.mkdtemp()
    con = duckdb.connect()
    con.execute("SET threads=1")
    w0, c0 = time.perf_counter(), time.process_time()
    con.execute(f"""
CREATE TEMP TABLE bronze AS
SELECT * FROM read_json('{events}', format='newline_delimited',
  columns={{event_id:'VARCHAR', ts:'VARCHAR', user_id:'BIGINT', amount:'DOUBLE',
            currency:'VARCHAR', country:'VARCHAR'}})
""")
    rows_in = con.execute("SELECT count(*) FROM bronze").fetchone()[0]
    con.execute("""
CREATE TEMP TABLE silver AS
SELECT event_id, TRY_CAST(ts AS TIMESTAMPTZ) AS ts, user_id, amount, currency, country
FROM (SELECT DISTINCT ON (event_id) * FROM bronze)
WHERE TRY_CAST(ts AS TIMESTAMPTZ) IS NOT NULL
  AND amount IS NOT NULL AND amount > 0
  AND regexp_full_match(currency, '[A-Z]{3}')
  AND country IS NOT NULL
""")
    silver_rows = con.execute("SELECT count(*) FROM silver").fetchone()[0]
    con.execute(f"COPY silver TO '{out}/silver.parquet' (FORMAT parquet, COMPRESSION zstd)")
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    con.close()
    shutil.rmtree(out, ignore_errors=True)
    return {"tool": f"duckdb {duckdb.__version__}", "rows_in": rows_in, "silver_rows": silver_rows,
            "wall_s": wall, "cpu_s": cpu}


async def main(args):
    sizes = [int(x) for x in args.events.split(",")]
    ours = [await run_size(args, n) for n in sizes]
    duck = duckdb_one_thread(events_file(os.path.expanduser(args.data_dir), sizes[-1]))
    big = ours[-1]
    our_rate = big["events"] / big["cpu_s"]
    duck_rate = duck["rows_in"] / duck["cpu_s"]
    out = ["", f"### Transform alone, Bronze → Silver ({time.strftime('%Y-%m-%d')}, `{' '.join(sys.argv)}`)", "",
           "The transform starts on a full Bronze backlog (filled beforehand by ingest) and parses, types, "
           "checks expectations, dedupes across the table and commits Silver + quarantine as Delta tables; "
           "its rate is events per CPU-second of the transform process. DuckDB: the shared job's parse + "
           "dedupe + filter + Silver Parquet write with `threads=1`, same file, same run.", "",
           "| events | transform wall s | transform CPU s | events per CPU-s | peak RSS MiB | silver | quarantine |",
           "|---|---|---|---|---|---|---|"]
    for r in ours:
        out.append(f"| {r['events']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['events'] / r['cpu_s']:,.0f} | "
                   f"{r['rss_mib']:.0f} | {r['silver']:,} | {r['quarantine']:,} |")
    out += ["", f"{duck['tool']}, `threads=1`, {duck['rows_in']:,} events → {duck['silver_rows']:,} silver rows: "
            f"parse + dedupe + filter + write Parquet in {duck['wall_s']:.2f} s wall, {duck['cpu_s']:.2f} CPU-s = "
            f"{duck_rate:,.0f} events per CPU-s. **Transform per core ÷ DuckDB per core: {our_rate / duck_rate:.2f}×** "
            "(the transform also types every column, hashes keys across the whole table, writes quarantine "
            "with reasons and keeps Delta history)."]
    if len(ours) > 1:
        a, b = ours[0], ours[-1]
        slope = (b["rss_mib"] - a["rss_mib"]) / ((b["keys"] - a["keys"]) / 1e6)
        out.append(f"Peak RSS grows {slope:.0f} MiB per million more keys ({a['keys']:,} → {b['keys']:,} keys: "
                   f"{a['rss_mib']:.0f} → {b['rss_mib']:.0f} MiB); the key set itself is 16 bytes per key plus the "
                   "hash set's slack.")
    append_results("\n".join(out) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", default="1000000,2000000")
    ap.add_argument("--lines", type=int, default=1000)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--data-dir", default="~/.cache/medallion-bench")
    ap.add_argument("--bin-dir", default="~/.cache/medallion-target/release")
    asyncio.run(main(ap.parse_args()))
