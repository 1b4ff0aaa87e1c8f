"""Real Postgres clients against the catalog's Postgres wire endpoint:
psql (Debian's postgresql-client) and psycopg 3. Run by
e2e/tests/bi_access.rs with the endpoint, the tokens and the expected
counts in the environment; every check prints one line, the first failure
exits non-zero with what was expected and what came back."""

import base64
import json
import os
import subprocess
import sys
import urllib.request

import psycopg

HOST = "127.0.0.1"
PORT = os.environ["PG_PORT"]
CERT = os.environ["TLS_ROOT_CERT"]
CATALOG = os.environ["CATALOG_URL"]
ADMIN, ANALYST, AUDITOR = (os.environ[f"TOKEN_{r}"] for r in ("ADMIN", "ANALYST", "AUDITOR"))
SILVER_ROWS = int(os.environ["EXPECT_SILVER_ROWS"])
GOLD = "finance.revenue_by_country_hourly"


def check(ok, what, got=None):
    if not ok:
        sys.exit(f"FAIL {what}: got {got!r}")
    print(f"ok   {what}")


def subject(token):
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["sub"]


def connect(token, dbname="gold", **kw):
    return psycopg.connect(
        host=HOST, port=PORT, dbname=dbname, user="bi-tool", password=token,
        sslmode="verify-full", sslrootcert=CERT, autocommit=True, **kw)


def rows(conn, sql, params=None):
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def http(method, path, token, body=None):
    req = urllib.request.Request(CATALOG + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def psql(token, *args, dbname="gold"):
    env = dict(os.environ, PGPASSWORD=token, PGSSLMODE="verify-full", PGSSLROOTCERT=CERT)
    r = subprocess.run(["psql", "-X", "-h", "localhost", "-p", PORT, "-U", "bi-tool", "-d", dbname,
                        "-v", "ON_ERROR_STOP=1", *args],
                       env=env, capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


# psql: the table list (\dt is a pg_catalog query) shows the role's tables only.
rc, out, err = psql(ANALYST, "-c", r"\dt finance.*")
check(rc == 0 and "revenue_by_country_hourly" in out, r"psql \dt lists the analyst's gold table", (rc, out, err))
rc, out, err = psql(ANALYST, "-c", r"\dt *.*", dbname="silver")
check(rc == 0 and "payments" not in out, r"psql \dt in silver shows the analyst nothing of silver", (rc, out, err))
rc, out, err = psql(ADMIN, "-c", r"\dt finance.*", dbname="silver")
check(rc == 0 and "payments__quarantine" in out and "| payments " in out,
      r"psql \dt in silver lists silver and quarantine for the admin", (rc, out, err))
# Not `\d <table>`: it finds the table's OID in one query and reads it back
# in the next, and datafusion-pg-catalog 0.19 does not keep OIDs stable
# across sessions (docs/reference.md says so).
rc, out, err = psql(ANALYST, "-At", "-c", f"SELECT sum(payments) FROM {GOLD}")
check(rc == 0 and out.strip() == str(SILVER_ROWS), "psql reads gold", (rc, out, err))
rc, out, err = psql(ANALYST, "-c", "SELECT count(*) FROM silver.finance.payments")
check(rc != 0 and "not granted" in err, "psql: silver refused to the analyst, with the reason", (rc, out, err))

# psycopg: catalog views, masks, refusals, parameters, time travel, limits.
with connect(ANALYST) as conn:
    tables = rows(conn, "SELECT table_catalog, table_schema, table_name FROM information_schema.tables "
                        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3")
    check(tables == [("gold", "finance", "revenue_by_country_hourly")],
          "information_schema holds only the analyst's table", tables)
    columns = rows(conn, "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                         "ORDER BY ordinal_position", ("revenue_by_country_hourly",))
    check([c for (c,) in columns] == ["country", "hour", "payments", "revenue"],
          "information_schema.columns (a parameterized query)", columns)
    total = rows(conn, f"SELECT sum(payments) FROM {GOLD} WHERE payments > %s", (0,))
    check(total == [(SILVER_ROWS,)], "a parameterized gold query", total)
    wire = rows(conn, f"SELECT country, hour, payments, revenue FROM {GOLD} ORDER BY country, hour")
    over_http = http("POST", "/v1/query", ANALYST,
                     {"sql": f"SELECT country, payments, revenue FROM gold.{GOLD} ORDER BY country, hour"})["rows"]
    check([(r[0], r[2], r[3]) for r in wire] == [(r["country"], r["payments"], r["revenue"]) for r in over_http],
          "gold over the wire equals gold over HTTP", (wire, over_http))
    try:
        rows(conn, "SELECT user_id FROM silver.finance.payments")
        check(False, "silver refused to the analyst")
    except psycopg.errors.InsufficientPrivilege as e:
        check("silver.finance.payments is not granted" in str(e), "silver refused to the analyst (42501)", str(e))
    for sql in ("CREATE TABLE gold.finance.x AS SELECT 1", "DELETE FROM finance.revenue_by_country_hourly",
                "COPY (SELECT 1) TO '/tmp/medallion-pg-copy'"):
        try:
            rows(conn, sql)
            check(False, f"refused: {sql}")
        except psycopg.Error as e:
            check(True, f"refused: {sql} ({e.sqlstate})")
    check(not os.path.exists("/tmp/medallion-pg-copy"), "COPY wrote no file")

with connect(AUDITOR, dbname="silver") as conn:
    masked = rows(conn, "SELECT user_id, amount FROM finance.payments")
    check(len(masked) == SILVER_ROWS and all(u is None for u, _ in masked),
          "the auditor sees every silver row with user_id masked (NULL)", masked[:3])

with connect(ADMIN, dbname="silver") as conn:
    latest = rows(conn, "SELECT count(*) FROM finance.payments")
    conn.execute("SET medallion.version = 1")
    v1 = rows(conn, "SELECT count(*) FROM finance.payments")
    over_http = http("POST", "/v1/query", ADMIN,
                     {"sql": "SELECT count(*) AS n FROM silver.finance.payments", "version": 1})["rows"]
    check(v1 == [(over_http[0]["n"],)] and latest == [(SILVER_ROWS,)],
          "time travel: SET medallion.version reads what HTTP reads at that version", (latest, v1, over_http))
    conn.execute("SET medallion.version = DEFAULT")
    check(rows(conn, "SELECT count(*) FROM finance.payments") == latest, "SET medallion.version = DEFAULT: latest again")
    conn.execute("SET statement_timeout = '300ms'")
    try:
        # 192^4 rows to add up (a count alone would be answered from statistics).
        rows(conn, "SELECT sum(a.amount + b.amount + c.amount + d.amount) "
                   "FROM finance.payments a, finance.payments b, finance.payments c, finance.payments d")
        check(False, "a query past statement_timeout is cancelled")
    except psycopg.errors.QueryCanceled as e:
        check("canceling statement" in str(e), "a query past statement_timeout is cancelled (57014)", str(e))
    check(rows(conn, "SELECT 1") == [(1,)], "the connection serves after a cancelled query")

try:
    connect(ADMIN[:-4] + "AAAA").close()
    check(False, "a wrong token is refused")
except psycopg.OperationalError as e:
    check("password authentication failed" in str(e), "a wrong token is refused", str(e))
try:
    connect(ADMIN, dbname="postgres").close()
    check(False, "an unknown database is refused")
except psycopg.OperationalError as e:
    check("gold, silver or bronze" in str(e), "an unknown database is refused with the layers named", str(e))

audit = http("GET", f"/v1/audit?user={subject(ANALYST)}", ADMIN)["records"]
denials = [r for r in audit if r.get("protocol") == "postgres" and not r["allowed"]]
allowed = [r for r in audit if r.get("protocol") == "postgres" and r["allowed"]]
check(any("silver.finance.payments" in r["target"] for r in denials) and allowed,
      "the analyst's queries and denials are audited with the protocol", audit[-5:])
