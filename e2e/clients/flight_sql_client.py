#!/usr/bin/env python3
"""What a BI tool or a notebook sees of the catalog over Arrow Flight SQL,
checked with the real client libraries (ADBC, pyarrow, polars) rather than
our own Rust client, so a protocol detail they rely on cannot regress
unnoticed.

Environment: FLIGHT_URI (grpc+tls://host:port), TLS_ROOT_CERT (PEM),
CATALOG_URL (HTTP API), TOKEN_ADMIN, TOKEN_ANALYST (gold of
finance.payments), TOKEN_AUDITOR (silver + gold, user_id masked),
EXPECT_SILVER_ROWS.

Prints one line per passing check; exits non-zero with the reason on the
first failure.
"""

import base64
import json
import os
import sys
import urllib.parse
import urllib.request

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import polars as pl
import pyarrow as pa
import pyarrow.ipc

GOLD = "gold.finance.revenue_by_country_hourly"
SILVER = "silver.finance.payments"
ALL_TABLES = {
    "bronze.finance.payments",
    "silver.finance.payments",
    "silver.finance.payments__quarantine",
    GOLD,
}
GOLD_QUERY = f"SELECT country, hour, payments, revenue FROM {GOLD} ORDER BY country, hour"


class CheckFailed(Exception):
    pass


def env(name):
    value = os.environ.get(name)
    if not value:
        raise CheckFailed(f"{name} is not set")
    return value


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def passed(message):
    print(f"ok: {message}", flush=True)


def subject(token):
    """The `sub` claim, so the audit query names the user the token is for."""
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    return json.loads(base64.urlsafe_b64decode(payload))["sub"]


def connect(token):
    with open(env("TLS_ROOT_CERT")) as f:
        root = f.read()
    return flight_sql.connect(
        env("FLIGHT_URI"),
        db_kwargs={
            "adbc.flight.sql.authorization_header": f"Bearer {token}",
            "adbc.flight.sql.client_option.tls_root_certs": root,
        },
        autocommit=True,
    )


def http(method, path, token, body=None, accept="application/json"):
    request = urllib.request.Request(
        env("CATALOG_URL").rstrip("/") + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": accept,
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise CheckFailed(f"{method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from e


def listed_tables(conn):
    """`layer.domain.table` of every table get_objects lists."""
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    names = set()
    for catalog in objects:
        for schema in catalog["catalog_db_schemas"] or []:
            for table in schema["db_schema_tables"] or []:
                names.add(f"{catalog['catalog_name']}.{schema['db_schema_name']}.{table['table_name']}")
    return names


def query(conn, sql, parameters=None):
    with conn.cursor() as cur:
        cur.execute(sql, parameters=parameters)
        return cur.fetch_arrow_table()


def same_values(a, b):
    """Equal values and column names, whatever the string or integer
    representation each path chose (Utf8 vs Utf8View, field metadata)."""
    if a.column_names != b.column_names or a.num_rows != b.num_rows:
        return False
    a = a.replace_schema_metadata(None)
    b = b.replace_schema_metadata(None)
    try:
        b = b.cast(a.schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        a = pa.Table.from_pylist(a.to_pylist())
        b = pa.Table.from_pylist(b.to_pylist())
    return a.equals(b)


def refused(action, *words):
    """Runs `action`, which must fail with an error naming one of `words`."""
    try:
        action()
    except (adbc_driver_manager.Error, pa.ArrowException) as e:
        text = str(e).lower()
        check(
            any(w in text for w in words),
            f"refused, but the message names none of {words}: {e}",
        )
        return str(e)
    raise CheckFailed("expected a refusal, the call succeeded")


def main():
    admin, analyst, auditor = env("TOKEN_ADMIN"), env("TOKEN_ANALYST"), env("TOKEN_AUDITOR")
    silver_rows = int(env("EXPECT_SILVER_ROWS"))

    with connect(analyst) as conn:
        seen = listed_tables(conn)
        check(seen == {GOLD}, f"the analyst should see exactly {GOLD}, get_objects listed {sorted(seen)}")
    passed(f"get_objects lists only {GOLD} for the analyst")
    with connect(admin) as conn:
        seen = listed_tables(conn)
        check(seen == ALL_TABLES, f"the admin should see {sorted(ALL_TABLES)}, get_objects listed {sorted(seen)}")
    passed("get_objects lists all four tables for the admin")

    with connect(analyst) as conn:
        over_flight = query(conn, GOLD_QUERY)
    body = http(
        "POST", "/v1/query", analyst, {"sql": GOLD_QUERY}, accept="application/vnd.apache.arrow.stream"
    )
    check(len(body) > 0, "the HTTP API answered the Gold query with an empty Arrow stream")
    over_http = pyarrow.ipc.open_stream(body).read_all()
    check(over_flight.num_rows > 0, "the Gold query returned no rows over Flight SQL")
    check(
        same_values(over_flight, over_http),
        f"Flight SQL and HTTP answers differ:\n{over_flight.slice(0, 5)}\nvs\n{over_http.slice(0, 5)}",
    )
    passed(f"the Gold query gives the same {over_flight.num_rows} rows over Flight SQL and HTTP")

    with connect(auditor) as conn:
        masked = query(conn, f"SELECT user_id, amount FROM {SILVER}")
    check(masked.num_rows == silver_rows, f"the auditor read {masked.num_rows} silver rows, expected {silver_rows}")
    check(
        masked.column("user_id").null_count == masked.num_rows,
        "user_id is masked for the auditor but some values came through",
    )
    passed(f"the auditor reads {silver_rows} silver rows with user_id masked")
    with connect(analyst) as conn:
        refused(lambda: query(conn, f"SELECT * FROM {SILVER}"), "not granted")
    passed("the analyst is refused silver (not granted)")

    with connect(analyst) as conn:
        counted = query(conn, f"SELECT count(*) AS n FROM {GOLD} WHERE payments > ?", parameters=(0,))
    n = counted.column("n")[0].as_py()
    check(n == over_flight.num_rows, f"the prepared count says {n}, the gold table has {over_flight.num_rows} rows")
    passed(f"a prepared statement with a bound parameter counts {n} gold rows")

    def bad_token():
        with connect(analyst[:-4] + "AAAA") as conn:
            query(conn, "SELECT 1")

    refused(bad_token, "unauthenticated", "token", "signature")
    passed("a bad token is refused")

    with connect(analyst) as conn:
        with conn.cursor() as cur:
            cur.execute(GOLD_QUERY)
            frame = pl.from_arrow(cur.fetch_arrow_table())
    check(isinstance(frame, pl.DataFrame), "polars did not build a DataFrame from the answer")
    check(frame.height == over_flight.num_rows, f"polars got {frame.height} rows, expected {over_flight.num_rows}")
    total = frame["payments"].sum()
    check(total == silver_rows, f"gold payments sum to {total} in polars, silver holds {silver_rows} rows")
    passed(f"polars reads the Gold answer: {frame.height} rows, {total} payments")

    analyst_sub = subject(analyst)
    records = json.loads(
        http("GET", "/v1/audit?" + urllib.parse.urlencode({"user": analyst_sub}), admin)
    )["records"]
    denials = [r for r in records if r.get("allowed") is False and r.get("protocol") == "flight-sql"]
    check(
        any(SILVER in r.get("target", "") for r in denials),
        f"no flight-sql denial of {SILVER} for {analyst_sub} in the audit log: {denials[-5:]}",
    )
    passed(f"the refusal is audited for {analyst_sub} with protocol flight-sql")

    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
