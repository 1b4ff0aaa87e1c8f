#!/usr/bin/env python3
"""Change-data-capture fixtures, and an independent reference for what
Medallion must make of them (written from the CDC semantics, not the Rust).

  fixtures --out DIR [--seed 7]   Debezium Postgres/MySQL and generic change events
                                  as NATS message bodies, and manifest.json
  stream --out DIR [--changes 50000] [--keys 5000] [--seed 11]
                                  a long Postgres feed, stream.json (kill -9 test)
  check --fixtures DIR (--lake LAKE | --expect-only) [--stream]
                                  expected Silver SCD1/SCD2 and Gold tables from the
                                  published files, compared with the lake's Delta tables

A record is one JSON value (`json`) or one line (`ndjson`); JSON null is a
tombstone, ignored. Debezium: the envelope is `payload` when the object has
`schema` and `payload`; c/r/u take the image from `after`, d the key from
`before`. Generic: the `op` field (c/insert, u/update, d/delete, r/snapshot, any
case) and the record as image. The sequence is the tuple of the `sequence_by`
values, higher wins. A change with an unknown op, a missing/mistyped key or
sequence, or a failing expectation is quarantined: it is no event of its key.
SCD1: per key the valid event with the highest sequence (a delete: no row).
SCD2: per key each non-delete event, `__start_at` its sequence, `__end_at` the
next event's (delete included) or null.
"""

import argparse
import json
import re
import math
import os
import random
import sys
from datetime import datetime, timedelta, timezone

T0 = datetime(2024, 5, 6, 8, 0, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
FIRST = ["Ada", "Bjørn", "Chloé", "Dmitri", "Eve", "Farah", "Gus", "Hiro", "Inès", "Jonas", "Kemi", "Zoë"]
LAST = ["O'Brien", "Nakamura", "Müller", "Okafor", "Silva", "Smith", "Dubois", 'Nash "Ace"', "Ng"]
TIERS = ["bronze", "silver", "gold", "platinum"]
STATUSES = ["pending", "paid", "shipped", "delivered", "cancelled", "refunded"]

# ---------------------------------------------------------------- contracts
SOURCES = {
    "crm": {"cdc": "debezium", "format": "ndjson", "sequence_by": ["source.lsn"], "key": "id",
            "columns": [("id", "int"), ("name", "string"), ("email", "string"), ("tier", "string"),
                        ("balance", "float"), ("updated_at", "timestamp")],
            "standardize": {"tier": str.upper}, "redact": {"email"},
            "expect": lambda row: row["balance"] is not None and row["balance"] >= 0},
    "shop": {"cdc": "debezium", "format": "json", "sequence_by": ["source.file", "source.pos", "source.row"],
             "key": "id", "standardize": {"status": str.lower},
             "columns": [("id", "int"), ("customer_id", "int"), ("status", "string"), ("amount", "float")]},
    "ops": {"cdc": "generic", "format": "ndjson", "operation": "op", "sequence_by": ["seq"], "key": "sku",
            "columns": [("sku", "string"), ("qty", "int"), ("seq", "int")]},
}
FILES = {"crm": "crm.customers", "shop": "shop.orders", "ops": "ops.inventory"}
PRODUCTS = {"crm.customers": ("crm", "scd1"), "crm.customers_history": ("crm", "scd2"),
            "shop.orders": ("shop", "scd1"), "shop.orders_history": ("shop", "scd2"),
            "ops.inventory": ("ops", "scd1")}
# gold product: (silver product, group column, group expression, [(column, aggregate, input)])
GOLD = {
    "crm.customers_by_tier": ("crm.customers", "tier", lambda r: r["tier"],
                              [("customers", "count", None), ("balance", "sum", "balance")]),
    "shop.orders_by_status": ("shop.orders", "status", lambda r: r["status"],
                              [("orders", "count", None), ("amount", "sum", "amount"),
                               ("smallest", "min", "amount"), ("largest", "max", "amount")]),
    "ops.inventory_totals": ("ops.inventory", "family", lambda r: r["sku"][:1],  # substr(sku, 1, 1)
                             [("skus", "count", None), ("units", "sum", "qty")]),
}
GENERIC_OPS = {"c": "c", "insert": "c", "u": "u", "update": "u", "d": "d", "delete": "d", "r": "r", "snapshot": "r"}
# planned invalid changes per source; the last one is always the final change of the feed
INVALID = {"crm": ["neg_balance", "missing_id", "unknown_op", "null_balance", "string_id", "neg_balance"],
           "shop": ["unknown_op", "missing_id", "unknown_op"], "ops": ["unknown_op", "missing_key", "unknown_op"]}


def connect_schema(topic, connector, columns, source):
    """The Kafka Connect JsonConverter schema of a Debezium envelope."""
    def field(label, typ, optional=True, **more):
        return dict(type=typ, optional=optional, field=label, **more)
    value = [field(n, "string", name="io.debezium.time.ZonedTimestamp", version=1) if t == "timestamp"
             else field(n, {"int": "int64", "string": "string", "float": "double"}[t], n != "id") for n, t in columns]
    block = [field(n, t, False) for n, t in [("id", "string"), ("total_order", "int64"),
                                             ("data_collection_order", "int64")]]
    return {"type": "struct", "optional": False, "name": f"{topic}.Envelope", "version": 1, "fields": [
        field("before", "struct", fields=value, name=f"{topic}.Value"),
        field("after", "struct", fields=value, name=f"{topic}.Value"),
        field("source", "struct", False, name=f"io.debezium.connector.{connector}.Source", fields=[
            field(k, "int64" if isinstance(v, int) else "string", k not in ("connector", "name", "ts_ms"))
            for k, v in source.items()]),
        field("op", "string", False), field("ts_ms", "int64"),
        field("transaction", "struct", fields=block, name="event.block", version=1)]}


# --------------------------------------------------------------- generation
def plan(rng, keys, n_initial, n_stream, invalid, initial_op="r"):
    """(op, key) in order: the first n_initial keys with initial_op, then inserts of
    new keys, updates, deletes, re-inserts after a delete, and the invalid kinds."""
    live, fresh, dead = list(keys[:n_initial]), list(keys[n_initial:]), []
    steps = [(initial_op, k) for k in live]
    bad_at = set(rng.sample(range(n_stream - 1), len(invalid) - 1)) | {n_stream - 1} if invalid else set()
    bad = iter(invalid)
    for i in range(n_stream):
        if i in bad_at:
            steps.append((next(bad), rng.choice(live)))
            continue
        op = rng.choices("cudR", [3 if fresh else 0, 10, 1.5 if len(live) > 10 else 0, 1.2 if dead else 0])[0]
        if op == "c":
            key = fresh.pop(0)
        elif op == "u":
            key = rng.choice(live)
        elif op == "d":
            key = live.pop(rng.randrange(len(live)))
            dead.append(key)
        else:
            key, op = dead.pop(rng.randrange(len(dead))), "c"
        if op == "c":
            live.append(key)
        steps.append((op, key))
    return steps

def cased(rng, word):
    return rng.choice([word, word, word.upper(), word.capitalize()])

def iso(rng, t):
    """A Debezium ZonedTimestamp: whole seconds, milliseconds or microseconds."""
    x, whole = rng.random(), t.strftime("%Y-%m-%dT%H:%M:%S")
    if x < 0.8:
        return whole + "Z" if x < 0.15 else f"{whole}.{t.microsecond // 1000:03d}Z"
    return f"{whole}.{t.microsecond + rng.randint(1, 999):06d}Z"

def customer(rng, key, old, t):
    new = dict(old) if old else {"id": key}
    if not old or rng.random() < 0.2:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        new["name"], new["email"] = f"{first} {last}", f"{first}.{last}{key}@example.com".lower().replace(" ", "")
    if not old or rng.random() < 0.4:
        new["tier"] = cased(rng, rng.choice(TIERS))
    if not old or rng.random() < 0.7:
        new["balance"] = rng.choice([0.0, round(rng.uniform(0, 5000), 2), round(rng.uniform(0, 50), 2)])
    new["updated_at"] = iso(rng, t)
    return new

def order(rng, key, old, t):
    if not old:
        draft = rng.random() < 0.08
        return {"id": key, "customer_id": rng.randint(1, 100), "status": cased(rng, "draft" if draft else "pending"),
                "amount": None if draft else round(rng.uniform(5, 900), 2)}
    new = dict(old)
    if old["status"].lower() != "draft" or rng.random() < 0.5:
        new["status"] = cased(rng, rng.choice(STATUSES))
        if old["amount"] is None or rng.random() < 0.3:
            new["amount"] = round(rng.uniform(5, 900), 2)
    return new

def change(rng, kind, key, cur, make, t, full_before, poison):
    """(op, before, after) of one planned step; `cur` holds the live images.
    An invalid change leaves `cur` alone and carries `poison`, so that applying it
    by mistake shows in the tables."""
    if kind in ("r", "c"):
        cur[key] = make(rng, key, None, t)
        return kind, None, cur[key]
    if kind == "u":
        before, cur[key] = cur[key], make(rng, key, cur[key], t)
        return "u", before if full_before else None, cur[key]
    if kind == "d":  # Postgres REPLICA IDENTITY DEFAULT: mostly the key only
        old = cur.pop(key)
        return "d", old if full_before or rng.random() < 0.3 else {c: key if c == "id" else None for c in old}, None
    after = dict(make(rng, key, cur[key], t), **poison)
    if kind == "neg_balance":
        after["balance"] = -round(rng.uniform(1, 900), 2)
    elif kind == "null_balance":
        after["balance"] = None
    elif kind == "missing_id":
        del after["id"]
    elif kind == "string_id":
        # Not a number at all: the platform types values with Arrow's casts,
        # which read a string of digits ("78") as the integer it spells.
        after["id"] = f"customer-{key}"
    return {"unknown_op": "x", "missing_id": "c", "string_id": "c"}.get(kind, "u"), None, after

def envelopes(rng, steps, positions, make, full_before, poison, topic, wrap):
    """Debezium records for the planned steps; `positions` yields each step's source
    block. About `wrap` of them are schema-wrapped; a delete is followed by a tombstone."""
    recs, cur, t, schema = [], {}, T0, None
    for (kind, key), source in zip(steps, positions):
        t += timedelta(milliseconds=rng.randint(20, 20_000))
        op, before, after = change(rng, kind, key, cur, make, t, full_before, poison)
        ms = int((t - EPOCH).total_seconds() * 1000)
        env = {"before": before, "after": after, "source": dict(source, ts_ms=ms), "op": op,
               "ts_ms": ms + rng.randint(3, 400), "transaction": None}
        schema = schema or connect_schema(topic, source["connector"], SOURCES[source["name"]]["columns"], source)
        recs.append({"schema": schema, "payload": env} if rng.random() < wrap else env)
        if kind == "d":
            recs.append(None)
    return recs

def snapshot_flags(steps):
    """Debezium's source.snapshot of each step: "true", "last" (the last snapshot read) or "false"."""
    last = sum(op == "r" for op, _ in steps) - 1
    return [("last" if i == last else "true") if op == "r" else "false" for i, (op, _) in enumerate(steps)]

def pg_positions(rng, steps, lsn=24_023_128, txid=780):
    """Postgres: lsn strictly increasing (snapshot included), one txId per change."""
    for (kind, _), snapshot in zip(steps, snapshot_flags(steps)):
        lsn += rng.randint(1, 60) * 8
        txid += kind != "r"
        yield {"version": "2.5.0.Final", "connector": "postgresql", "name": "crm", "ts_ms": 0,
               "snapshot": snapshot, "db": "crm",
               "sequence": json.dumps([str(lsn - 8 * rng.randint(1, 4)), str(lsn)]), "schema": "public",
               "table": "customers", "txId": txid, "lsn": lsn, "xmin": None}

def mysql_positions(rng, steps):
    """MySQL: the snapshot at one binlog position (rows 0..n), then events of 1-3
    rows; the binlog rotates 3/5 of the way, so positions restart low."""
    file, pos, row, left, gtid = "mysql-bin.000003", 154, -1, 0, 22
    stream = [i for i, (op, _) in enumerate(steps) if op != "r"]
    for i, ((kind, _), snapshot) in enumerate(zip(steps, snapshot_flags(steps))):
        if kind != "r" and i == stream[len(stream) * 3 // 5]:
            file, pos, left = "mysql-bin.000004", 4, 0
        if kind != "r" and left == 0:
            pos, row, left, gtid = pos + rng.randint(150, 2500), -1, rng.choice([1, 1, 1, 2, 3]), gtid + 1
        row, left = row + 1, left - (kind != "r")
        yield {"version": "2.5.0.Final", "connector": "mysql", "name": "shop", "ts_ms": 0,
               "snapshot": snapshot, "db": "shop", "sequence": None, "table": "orders",
               "server_id": 0 if kind == "r" else 223344,
               "gtid": None if kind == "r" else f"3e11fa47-71ca-11e1-9e33-c80aa9429562:{gtid}",
               "file": file, "pos": pos, "row": row, "thread": None if kind == "r" else 7, "query": None}

def inventory_records(rng, steps):
    """Generic flat records, {"sku", "qty", "op", "seq"} and fields outside the contract."""
    names = {"r": ["r", "snapshot", "SNAPSHOT"], "c": ["c", "insert", "INSERT", "Insert"],
             "u": ["u", "update", "UPDATE", "U"], "d": ["d", "delete", "DELETE", "D"]}
    recs, seq = [], 0
    for kind, key in steps:
        seq += rng.randint(1, 4)
        rec = {"sku": key, "qty": None if rng.random() < 0.06 else rng.randint(0, 250),
               "op": rng.choice(names.get(kind, names["u"])), "seq": seq}
        if rng.random() < 0.3:
            rec["warehouse"] = rng.choice(["ams-1", "fra-2"])
        if kind == "d" and rng.random() < 0.6:
            del rec["qty"]
        elif kind == "unknown_op":
            rec["op"] = "x"
        elif kind == "missing_key":
            del rec["sku"]
        recs.append(rec)
    return recs

def pg_records(rng, steps, wrap):
    positions = pg_positions(rng, steps)
    return envelopes(rng, steps, positions, customer, False, {"tier": "DIAMOND"}, "crm.public.customers", wrap)

def mysql_records(rng, steps, wrap):
    positions = mysql_positions(rng, steps)
    return envelopes(rng, steps, positions, order, True, {"status": "LOST"}, "shop.shop.orders", wrap)

def pack(rng, lines, fmt, most):
    """Record lines grouped in order into message bodies (ndjson) or one per body (json)."""
    if fmt == "json":
        return list(lines)
    bodies, i = [], 0
    while i < len(lines):
        n = rng.randint(1, most)
        bodies.append("\n".join(lines[i:i + n]) + "\n")
        i += n
    return bodies

def generate(seed):
    """{source: (messages in publish order, shuffled messages with duplicates)}."""
    rng = random.Random(seed)
    skus = [f"{f}{n}" for f in "abcde" for n in range(1, 11)]
    recs = {"crm": pg_records(rng, plan(rng, range(1, 101), 60, 240, INVALID["crm"]), 0.5),
            "shop": mysql_records(rng, plan(rng, range(1001, 1101), 50, 250, INVALID["shop"]), 0.5),
            "ops": inventory_records(rng, plan(rng, skus, 30, 120, INVALID["ops"]))}
    out = {}
    for src, rs in recs.items():
        fmt, lines = SOURCES[src]["format"], [json.dumps(r, separators=(",", ":"), ensure_ascii=False) for r in rs]
        messages = pack(rng, lines, fmt, 8)
        mixed = lines + rng.sample(lines, round(len(lines) * 0.15))  # ~15% of the records twice
        rng.shuffle(mixed)
        shuffled = pack(rng, mixed, fmt, 12)
        for body in rng.sample(shuffled, 3):  # and three whole messages
            shuffled.insert(rng.randrange(len(shuffled) + 1), body)
        out[src] = (messages, shuffled)
    return out


# ---------------------------------------------------------------- reference
def records(bodies, fmt):
    for body in bodies:
        yield from [json.loads(body)] if fmt == "json" else (json.loads(line) for line in body.splitlines() if line.strip())

def dig(obj, path):
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj

def interpret(src, rec):
    """None for a tombstone, "invalid" for a quarantined change, else (key, seq, op, row)."""
    if rec is None:
        return None
    if not isinstance(rec, dict):
        return "invalid"
    key = src["key"]
    if src["cdc"] == "debezium":
        env = rec["payload"] if "schema" in rec and "payload" in rec else rec
        op = env.get("op") if isinstance(env, dict) else None
        image = env.get("before" if op == "d" else "after") if op else None
    else:
        env = image = rec
        raw = rec.get(src["operation"])
        op = GENERIC_OPS.get(raw.lower()) if isinstance(raw, str) else None
    seq = tuple(dig(env, p) for p in src["sequence_by"])
    key_type = int if dict(src["columns"])[key] == "int" else str
    if isinstance(image, dict) and key_type is int and isinstance(image.get(key), str) \
            and re.fullmatch(r"-?[0-9]+", image[key]):
        image = dict(image, **{key: int(image[key])})  # Arrow's cast reads "78" as 78
    if op not in ("c", "r", "u", "d") or not isinstance(image, dict) or None in seq \
            or type(image.get(key)) is not key_type:  # noqa: E721 (bool is no integer key)
        return "invalid"
    if op == "d":
        return image[key], seq, op, None
    row = {}
    for col, _ in src["columns"]:
        value = None if col in src.get("redact", ()) else image.get(col)
        fix = src.get("standardize", {}).get(col)
        row[col] = fix(value) if fix and isinstance(value, str) else value
    return "invalid" if "expect" in src and not src["expect"](row) else (image[key], seq, op, row)

def render(seq):
    if len(seq) == 1 and isinstance(seq[0], int):
        return seq[0]
    return "/".join(f"{v:020d}" if isinstance(v, int) else str(v) for v in seq)

def changes(src, bodies):
    """{key: {seq: (op, row)}} of the valid changes (duplicates collapse), invalid count."""
    per_key, invalid = {}, 0
    for rec in records(bodies, src["format"]):
        ev = interpret(src, rec)
        if ev == "invalid":
            invalid += 1
        elif ev is not None:
            key, seq, op, row = ev
            seen = per_key.setdefault(key, {})
            if seen.setdefault(seq, (op, row)) != (op, row):
                raise SystemExit(f"fixture bug: key {key!r} has two different changes at {seq!r}")
    return per_key, invalid

def scd1(per_key):
    winners = [(evs[max(evs)], max(evs)) for evs in per_key.values()]
    return [dict(row, __sequence=render(seq)) for (op, row), seq in winners if op != "d"]

def scd2(per_key):
    rows = []
    for evs in per_key.values():
        seqs = sorted(evs) + [None]
        rows += [dict(evs[s][1], __start_at=render(s), __end_at=render(nxt) if nxt else None)
                 for s, nxt in zip(seqs, seqs[1:]) if evs[s][0] != "d"]
    return rows

def gold(rows, group_col, group, aggs):
    groups = {}
    for r in rows:
        groups.setdefault(group(r), []).append(r)
    out = []
    for g, members in groups.items():
        res = {group_col: g}
        for col, fn, arg in aggs:
            vals = [m[arg] for m in members if m[arg] is not None] if arg else members
            res[col] = len(vals) if fn == "count" else ({"sum": sum, "min": min, "max": max}[fn](vals) if vals else None)
        out.append(res)
    return out

def load(fixdir, stream):
    """{source: message bodies} as published, and the Silver products they feed."""
    def read(name):
        with open(os.path.join(fixdir, name), encoding="utf-8") as f:
            return json.load(f)
    if stream:
        return {"crm": read("stream.json")}, ["crm.customers"]
    manifest, bodies = read("manifest.json")["products"], {}
    for src, stem in FILES.items():
        bodies[src] = read(manifest[stem]["messages"])
        if changes(SOURCES[src], bodies[src])[0] != changes(SOURCES[src], read(manifest[stem]["shuffled"]))[0]:
            raise SystemExit(f"fixtures of {stem}: the shuffled messages hold other changes")
    return bodies, list(PRODUCTS)

def expected(bodies, products):
    """{table: (typed columns, key columns, rows)} and {product: invalid records}."""
    tables, invalid, silver = {}, {}, {}
    for product in products:
        src, stored = PRODUCTS[product]
        spec = SOURCES[src]
        per_key, invalid[product] = changes(spec, bodies[src])
        seq = "int" if spec["cdc"] == "generic" or len(spec["sequence_by"]) == 1 else "string"
        if stored == "scd1":
            rows = silver[product] = scd1(per_key)
            tables["silver." + product] = (spec["columns"] + [("__sequence", seq)], [spec["key"]], rows)
        else:
            tables["silver." + product] = (spec["columns"] + [("__start_at", seq), ("__end_at", seq)],
                                           [spec["key"], "__start_at"], scd2(per_key))
    for product, (of, group_col, group, aggs) in GOLD.items():
        if of in silver:
            cols = [(group_col, "string")] + [(c, "int" if fn == "count" else "num") for c, fn, _ in aggs]
            tables["gold." + product] = (cols, [group_col], gold(silver[of], group_col, group, aggs))
    return tables, invalid


# ------------------------------------------------------------------ compare
def norm(value, typ):
    """Comparable form: timestamps as UTC microseconds, numbers as numbers."""
    if value is None or typ == "num":
        return value
    if typ == "timestamp":
        value = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
        delta = (value if value.tzinfo else value.replace(tzinfo=timezone.utc)) - EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return {"int": int, "float": float}.get(typ, str)(value)

def same(a, b):
    if a is None or b is None or isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)

def compare(cols, keys, want_rows, got_rows):
    """Readable differences between expected and actual rows, matched on `keys`."""
    names, types = [c for c, _ in cols], dict(cols)

    def show(pairs):
        return ", ".join(f"{n}=" + (f"{EPOCH + timedelta(microseconds=v):%Y-%m-%dT%H:%M:%S.%fZ}"
                                    if types[n] == "timestamp" and v is not None else repr(v)) for n, v in pairs)

    def by_key(rows):
        out = {}
        for r in rows:
            t = tuple(norm(r.get(c), types[c]) for c in names)
            out.setdefault(tuple(t[names.index(k)] for k in keys), []).append(t)
        return out
    want, got, problems = by_key(want_rows), by_key(got_rows), []
    for key in sorted(set(want) | set(got), key=lambda k: [(v is None, v if v is not None else 0) for v in k]):
        w, g, label = want.get(key, []), got.get(key, []), show(zip(keys, key))
        if not g:
            problems.append(f"  - missing    {label}: {show(zip(names, w[0]))}")
        elif len(g) > len(w):
            problems += [f"  + unexpected {label}: {show(zip(names, t))}" for t in g[len(w):]]
        elif not all(map(same, w[0], g[0])):
            problems.append(f"  ~ differs    {label}: " + "; ".join(
                f"{show([(n, a)])} expected, got {show([(n, b)])}" for n, a, b in zip(names, w[0], g[0])
                if not same(a, b)))
    return problems

def cmd_check(args):
    tables, invalid = expected(*load(args.fixtures, args.stream))
    if args.expect_only:
        print("\n".join([f"expect {t} rows={len(rows)}" for t, (_, _, rows) in tables.items()]
                        + [f"expect {p} invalid_records={n}" for p, n in invalid.items()]))
        return 0
    from deltalake import DeltaTable
    failed = 0
    for table, (cols, keys, rows) in tables.items():
        path = "/".join([args.lake.rstrip("/"), *table.split(".")])  # <lake>/<layer>/<domain>/<product>
        try:
            data = DeltaTable(path).to_pyarrow_table()
        except Exception as e:  # a missing or unreadable table is a mismatch like any other
            print(f"FAIL {table}: cannot read {path}: {e}")
            failed = 1
            continue
        absent = [c for c, _ in cols if c not in data.column_names]
        problems = [f"  columns missing: {', '.join(absent)} (has {', '.join(data.column_names)})"] if absent \
            else compare(cols, keys, rows, data.to_pylist())
        if problems:
            failed = 1
            print(f"FAIL {table}: expected {len(rows)} rows, got {data.num_rows}; {len(problems)} differences")
            print("\n".join(problems[:10]))
        else:
            print(f"ok {table} rows={data.num_rows}")
    return failed


# ---------------------------------------------------------------------- CLI
def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=2 if isinstance(value, dict) else None)

def cmd_fixtures(args):
    os.makedirs(args.out, exist_ok=True)
    generated = generate(args.seed)
    tables, invalid = expected({src: messages for src, (messages, _) in generated.items()}, PRODUCTS)
    manifest = {"products": {}, "gold": {of: {"from": GOLD[of][0], "expected_rows": len(tables["gold." + of][2])}
                                         for of in GOLD}}
    for src, (messages, shuffled) in generated.items():
        stem, spec = FILES[src], SOURCES[src]
        write_json(os.path.join(args.out, f"{stem}.json"), messages)
        write_json(os.path.join(args.out, f"{stem}.shuffled.json"), shuffled)
        recs = list(records(messages, spec["format"]))
        for product in (p for p, (s, _) in PRODUCTS.items() if s == src):
            m = manifest["products"][product] = {
                "subject": f"medallion.ingest.{product}", "cdc_format": spec["cdc"], "source_format": spec["format"],
                "stored_as": PRODUCTS[product][1], "messages": f"{stem}.json", "shuffled": f"{stem}.shuffled.json",
                "message_count": len(messages), "shuffled_message_count": len(shuffled), "records": len(recs),
                "changes": len(recs) - recs.count(None) - invalid[product], "tombstones": recs.count(None),
                "invalid_records": invalid[product], "expected_rows": len(tables["silver." + product][2])}
            print(f"{product}: {m['records']} records ({m['changes']} changes, {m['tombstones']} tombstones, "
                  f"{m['invalid_records']} invalid) in {len(messages)} messages -> {m['expected_rows']} rows")
    write_json(os.path.join(args.out, "manifest.json"), manifest)
    expected(*load(args.out, False))  # the shuffled files hold the same changes
    return 0

def cmd_stream(args):
    os.makedirs(args.out, exist_ok=True)
    rng = random.Random(args.seed)
    steps = plan(rng, range(1, args.keys + 1), args.keys, args.changes - args.keys, [], initial_op="c")
    lines = [json.dumps(r, separators=(",", ":"), ensure_ascii=False) for r in pg_records(rng, steps, 0) if r]
    bodies = ["\n".join(lines[i:i + 100]) + "\n" for i in range(0, len(lines), 100)]
    write_json(os.path.join(args.out, "stream.json"), bodies)
    print(f"stream: {len(lines)} changes over {args.keys} keys in {len(bodies)} messages")
    return 0

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, seed in (("fixtures", 7), ("stream", 11)):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--changes", type=int, default=50_000)
    p.add_argument("--keys", type=int, default=5_000)
    p = sub.add_parser("check")
    p.add_argument("--fixtures", required=True)
    p.add_argument("--lake")
    p.add_argument("--stream", action="store_true", help="crm.customers and its Gold from stream.json only")
    p.add_argument("--expect-only", action="store_true", help="print the expected row counts, read no lake")
    args = parser.parse_args()
    if args.command == "check" and not (args.lake or args.expect_only):
        parser.error("check needs --lake or --expect-only")
    code = {"fixtures": cmd_fixtures, "stream": cmd_stream, "check": cmd_check}[args.command](args)
    # deltalake/pyarrow scanner threads can abort the interpreter's shutdown ("terminate
    # called without an active exception", exit 134; delta-rs#2184, arrow#34314): skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
