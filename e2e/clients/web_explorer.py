"""The catalog explorer in Chromium (Playwright, the system browser): what
each role sees, refusals as readable messages, search, lineage, SQL and
downloads, a revision diff, the audit log; no console error and no request
to another host. Prints page weight and render times; saves screenshots to
SCREENSHOT_DIR. Run by e2e/tests/web_explorer.rs against the real catalog."""

import io
import json
import os
import statistics
import sys
import time
import urllib.error
import urllib.request

from playwright.sync_api import sync_playwright

URL = os.environ["CATALOG_URL"].rstrip("/")
ADMIN = os.environ["TOKEN_ADMIN"]
ANALYST = os.environ["TOKEN_ANALYST"]
AUDITOR = os.environ["TOKEN_AUDITOR"]
SILVER_ROWS = int(os.environ["EXPECT_SILVER_ROWS"])
QUARANTINED = int(os.environ["EXPECT_QUARANTINED"])
BY_COUNTRY = dict(
    (c, int(n)) for c, n in (kv.split("=") for kv in os.environ["EXPECT_BY_COUNTRY"].split(","))
)
SHOTS = os.environ["SCREENSHOT_DIR"]
DOWNLOADS = os.environ["DOWNLOAD_DIR"]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

BULK = 200
WIDE_GOLD = 23  # 4 table nodes + 23 gold tables + 23 gold columns = 50 nodes


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


def call(method, path, token, body=None, content_type="application/yaml"):
    req = urllib.request.Request(URL + path, method=method, data=body.encode() if body else None)
    req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def spec(domain, name, extra_columns="", gold="", access="", tags="[]", description=None):
    return f"""apiVersion: medallion.dev/v1alpha1
kind: DataProduct
metadata:
  name: {name}
spec:
  domain: {domain}
  owner: {domain}@example.com
  description: {description or f"{domain} {name}"}
  tags: {tags}
  source:
    format: ndjson
  schema:
    - {{name: order_id, type: string, required: true}}
{extra_columns}  key: [order_id]
{gold}{access}"""


def put(domain, name, text):
    status, body = call("PUT", f"/v1/products/{domain}/{name}", ADMIN, text)
    if status != 200:
        check(False, f"PUT {domain}.{name} as admin: {status} {body}")
    return body


def register():
    """Products made through the API as admin: one with two revisions (the
    diff), 200 small ones (the list's render time), one with many Gold
    tables (the lineage graph's render time). None is granted to analyst."""
    t0 = time.time()
    put("shop", "orders", spec("shop", "orders", tags="[shop]", description="Orders"))
    r = put("shop", "orders", spec("shop", "orders", "    - {name: gift_note, type: string}\n",
                                   tags="[shop]", description="Orders"))
    check(r["revision"] >= 2 and not r["breaking_changes"], f"shop.orders revision 2 adds a column: {r}")
    for i in range(BULK):
        put("bulk", f"p{i:03d}", spec("bulk", f"p{i:03d}", tags="[bulk]"))
    gold = "  gold:\n" + "".join(
        f"    - name: wide_{k:02d}\n      sql: SELECT count(*) AS n_{k:02d} FROM silver\n" for k in range(WIDE_GOLD)
    )
    put("lab", "wide", spec("lab", "wide", gold=gold, tags="[lab]"))
    print(f"registered {BULK + 3} products through PUT in {time.time() - t0:.1f} s", flush=True)


def main():
    register()
    os.makedirs(SHOTS, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            run(browser)
        finally:
            browser.close()


def watch(page, log):
    """Records requests to other hosts, console errors and uncaught exceptions."""
    def on_request(r):
        u = r.url
        if not (u.startswith(URL + "/") or u == URL or u.startswith(f"blob:{URL}/") or u.startswith("data:")):
            log["foreign"].append(u)

    def on_console(m):
        # Chromium logs every non-2xx fetch; the refusals this test provokes are expected.
        if m.type == "error" and not (
            "Failed to load resource" in m.text and any(f"status of {c}" in m.text for c in (400, 401, 403))
        ):
            log["errors"].append(m.text)

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda e: log["errors"].append(f"uncaught: {e}"))


def shot(page, name, full=False):
    path = os.path.join(SHOTS, f"{name}.png")
    page.screenshot(path=path, full_page=full)
    print(f"screenshot: {path}", flush=True)


def sign_in_with_form(page, token, accepted=True, screenshot=None):
    page.goto(URL + "/")
    page.wait_for_selector("#login-form", state="visible")
    check(not page.is_visible("#nav"), "signed out, the sign-in form shows and the navigation does not")
    if screenshot:
        shot(page, screenshot)
    page.fill("#token", token)
    page.click("#login-form button[type=submit]")
    if accepted:
        page.wait_for_selector("table.products, .empty")


def sign_in_with_link(page, token, then="#/products"):
    page.goto(f"{URL}/#token={token}")
    page.wait_for_selector("#nav", state="visible")
    check("token=" not in page.url, "the token leaves the URL after a sign-in link")
    check(page.evaluate("sessionStorage.getItem('medallion.token')") == token, "the token is in sessionStorage")
    if then:
        go(page, then)


def until(page, js, what="", timeout=30):
    """Polls `js` with evaluate (not wait_for_function: its string eval is
    what the page's CSP forbids, and must keep forbidding)."""
    deadline = time.time() + timeout
    while True:
        v = page.evaluate(js)
        if v:
            return v
        if time.time() > deadline:
            check(False, f"timed out waiting for {what or js}")
        time.sleep(0.02)


def go(page, hash_):
    page.evaluate("h => { location.hash = h; }", hash_)
    until(page, f"() => {{ const v = document.getElementById('view'); return v.dataset.route === {json.dumps(hash_)} && v.dataset.state === 'ready'; }}",
          f"page {hash_}")


def grid(page):
    heads = page.locator("#sql-out table.grid thead th").all_inner_texts()
    rows = []
    for tr in page.locator("#sql-out table.grid tbody tr").all():
        cells = tr.locator("td").all()
        rows.append({h: (None if "null" in (c.get_attribute("class") or "") else c.inner_text()) for h, c in zip(heads, cells)})
    return heads, rows


def run_sql(page, sql, travel=None, at=None):
    go(page, "#/sql")
    page.fill("#sql-text", sql)
    page.select_option("#sql-travel", travel or "")
    if travel:
        page.fill("#sql-at", str(at))
    page.click("#run")
    page.wait_for_selector("#sql-out .count, #sql-out .msg.error")


def error_text(page, sel=".msg.error"):
    page.wait_for_selector(sel)
    return page.locator(sel).first.inner_text()


def run(browser):
    log = {"foreign": [], "errors": []}
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    watch(page, log)

    # --- analyst: gold of finance.payments only ---
    sign_in_with_form(page, ANALYST, screenshot="0-sign-in")
    shown = page.locator("table.products tbody tr").evaluate_all("rs => rs.map(r => r.dataset.product)")
    check(shown == ["finance.payments"], f"analyst sees only the granted product: {shown}")
    layers = page.locator("table.products .layer").all_inner_texts()
    check(layers and all(t.startswith("gold") for t in layers), f"analyst sees only gold tables: {layers}")
    check("alan" in page.inner_text("#who"), "the header names who is signed in")
    go(page, "#/products/finance/payments")
    blocks = page.locator(".layer-block h3").all_inner_texts()
    check(blocks == ["Gold"], f"analyst's product page lists gold tables only: {blocks}")

    run_sql(page, "SELECT country, sum(payments) AS n FROM gold.finance.revenue_by_country_hourly GROUP BY country ORDER BY country")
    heads, rows = grid(page)
    got = {r["country"]: int(r["n"]) for r in rows}
    check(heads == ["country", "n"] and got == BY_COUNTRY, f"a Gold query returns the expected rows: {got} == {BY_COUNTRY}")

    run_sql(page, "SELECT * FROM silver.finance.payments LIMIT 5")
    msg = error_text(page, "#sql-out .msg.error")
    check(msg.startswith("Not allowed:") and "silver.finance.payments is not granted" in msg,
          f"a 403 reads as a sentence with the API's reason: {msg!r}")
    go(page, "#/audit")
    msg = error_text(page)
    check("Not allowed" in msg and "admin role" in msg, f"the audit log refuses a non-admin readably: {msg!r}")
    go(page, "#/quarantine/finance/payments")
    msg = error_text(page)
    check("Not allowed" in msg and "__quarantine" in msg, f"quarantine is refused to analyst: {msg!r}")
    go(page, "#/products/shop/orders")
    msg = error_text(page)
    check("Not allowed" in msg, f"an ungranted product page is refused: {msg!r}")
    page.click("#signout")
    page.wait_for_selector("#login-form", state="visible")
    check(page.evaluate("sessionStorage.getItem('medallion.token')") is None, "signing out forgets the token")

    # A token the catalog refuses: the 401 in words, and the sign-in form back.
    sign_in_with_form(page, ANALYST[:-4] + ("AAAA" if not ANALYST.endswith("AAAA") else "BBBB"), accepted=False)
    msg = error_text(page)
    check(msg.startswith("Not signed in:") and page.is_visible("#login-form"), f"a refused token reads as a 401 sentence: {msg!r}")

    # --- auditor: silver with user_id masked ---
    sign_in_with_link(page, AUDITOR, then=None)
    run_sql(page, "SELECT event_id, user_id, amount FROM silver.finance.payments ORDER BY event_id LIMIT 20")
    heads, rows = grid(page)
    check(len(rows) == 20 and all(r["user_id"] is None for r in rows) and all(r["event_id"] for r in rows),
          "the masked column is empty (NULL) in every row of the grid, the others are not")
    check(page.locator("#sql-out td.null").count() >= 20, "masked cells are marked as NULL")

    # --- admin: everything ---
    sign_in_with_link(page, ADMIN)
    n_rows = page.locator("table.products tbody tr").count()
    check(n_rows == BULK + 3, f"admin sees every product: {n_rows}")
    shot(page, "1-products")
    page.select_option("select[name=tag]", "pii")
    until(page, "() => document.querySelectorAll('table.products tbody tr').length === 1")
    shown = page.locator("table.products tbody tr").evaluate_all("rs => rs.map(r => r.dataset.product)")
    check(shown == ["finance.payments"] and "tag=pii" in page.url, f"search by tag pii finds finance.payments: {shown}")
    page.select_option("select[name=tag]", "")
    until(page, "() => document.querySelectorAll('table.products tbody tr').length > 1", "the filter cleared")
    page.fill("input[name=q]", "card payment")
    until(page, "() => location.hash.includes('q=card') && document.querySelectorAll('table.products tbody tr').length === 1",
          "text search narrows the list to one product")
    check(page.locator("table.products tbody tr").get_attribute("data-product") == "finance.payments", "text search finds finance.payments, and the URL says so")
    shot(page, "1b-products-search")

    go(page, "#/products/finance/payments")
    text = page.inner_text("#view")
    for want in ["PII: hash", "positive_amount", "amount > 0", "Freshness SLA", "60s", "revenue_by_country_hourly", "payments-team@example.com"]:
        check(want in text, f"the product page shows {want!r}")
    check(page.locator(".layer-block h3").all_inner_texts() == ["Bronze", "Silver", "Gold"], "admin's product page lists every layer")
    check(page.locator("[data-count=quarantined]").inner_text() == str(QUARANTINED), "quality counts the quarantined rows")
    per_hour = {k: sum(int(v) for v in page.locator(f"svg.quality rect.bar.{k}").evaluate_all("rs => rs.map(r => r.dataset.value)"))
                for k in ["rows_in", "rows_out", "quarantined"]}
    check(per_hour == {"rows_in": 200, "rows_out": 200 - QUARANTINED, "quarantined": QUARANTINED},
          f"quality over time: the hourly bars add up to the totals {per_hour}")
    page.locator("details[data-history='silver.finance.payments'] summary").click()
    until(page, "() => document.querySelectorAll(\"details[data-history='silver.finance.payments'] tbody tr\").length >= 2",
          "the silver table's commits")
    added = page.locator("details[data-history='silver.finance.payments'] tbody tr").evaluate_all(
        "rs => rs.map(r => Number(r.children[3].textContent.replace(/[^0-9]/g, '')))")
    check(sum(added) == 200 - QUARANTINED and len([a for a in added if a > 0]) >= 2,
          f"the silver table's history: commits adding {added} rows")
    shot(page, "2-product", full=True)

    go(page, "#/lineage/finance/payments")
    counts = {l: page.locator(f"svg.lineage g.node[data-layer={l}]").count() for l in ["source", "bronze", "silver", "gold", "column"]}
    check(counts["bronze"] == 1 and counts["silver"] == 2 and counts["gold"] == 1 and counts["column"] == 4 and counts["source"] == 1,
          f"the lineage graph draws bronze, silver (+ quarantine), gold and gold columns: {counts}")
    check(page.locator("svg.lineage path.edge").count() == 8, "and an edge per step and gold column")
    box = {l: page.locator(f"svg.lineage g.node[data-layer={l}]").first.bounding_box() for l in ["bronze", "silver", "gold"]}
    check(box["bronze"]["x"] < box["silver"]["x"] < box["gold"]["x"], "bronze → silver → gold read left to right")
    shot(page, "3-lineage")

    go(page, "#/products/shop/orders")
    page.wait_for_selector("pre.diff")
    added = page.locator("pre.diff .add").all_inner_texts()
    check(any("gift_note" in a for a in added) and page.locator("pre.diff .del").count() == 0,
          f"the revision diff shows the added column: {added}")
    page.locator("#revisions").scroll_into_view_if_needed()
    shot(page, "4-revision-diff")

    go(page, "#/quarantine/finance/payments")
    page.wait_for_selector("table.grid")
    heads = page.locator("table.grid thead th").all_inner_texts()
    qrows = page.locator("table.grid tbody tr").count()
    payload = page.locator("table.grid tbody tr").first.locator("td").nth(heads.index("payload")).inner_text()
    check(qrows == QUARANTINED and payload.startswith('{"event_id"'), f"admin sees {qrows} quarantined rows with the raw payload")
    shot(page, "5-quarantine")

    # Time travel: the grid says what the API says for the same request.
    run_sql(page, "SELECT count(*) AS n FROM silver.finance.payments", "version", 1)
    _, rows = grid(page)
    _, api = call("POST", "/v1/query", ADMIN, json.dumps({"sql": "SELECT count(*) AS n FROM silver.finance.payments", "version": 1}), "application/json")
    check(int(rows[0]["n"]) == api["rows"][0]["n"] and 0 < int(rows[0]["n"]) < SILVER_ROWS,
          f"version 1 of silver holds {rows[0]['n']} rows, fewer than the latest {SILVER_ROWS}")
    run_sql(page, "SELECT count(*) AS n FROM silver.finance.payments", "as_of", "2000-01-01T00:00:00Z")
    msg = error_text(page, "#sql-out .msg.error")
    check(msg.startswith("Refused (400):") and "no version as of" in msg, f"as_of before the table existed reads as the API's reason: {msg!r}")

    sql = "SELECT event_id, country, amount FROM silver.finance.payments ORDER BY event_id"
    run_sql(page, sql)
    heads, rows = grid(page)
    check(len(rows) == SILVER_ROWS, f"the grid holds every silver row: {len(rows)}")
    shot(page, "6-sql")
    with page.expect_download() as d:
        page.click("#csv")
    path = os.path.join(DOWNLOADS, "q.csv")
    d.value.save_as(path)
    lines = open(path, newline="").read().split("\r\n")
    check(lines[0] == "event_id,country,amount" and len([l for l in lines[1:] if l]) == SILVER_ROWS
          and lines[1] == ",".join(rows[0][h] for h in heads), "the CSV download holds the grid's rows")
    with page.expect_download() as d:
        page.click("#arrow")
    path = os.path.join(DOWNLOADS, "q.arrows")
    d.value.save_as(path)
    import pyarrow.ipc as ipc
    t = ipc.open_stream(open(path, "rb").read()).read_all()
    check(t.num_rows == SILVER_ROWS and t.column_names == ["event_id", "country", "amount"], "the Arrow download is the same answer")

    go(page, "#/audit")
    page.wait_for_selector("table.audit")
    text = page.inner_text("table.audit")
    check("alan" in text and "denied" in text and "grace" in text, "the audit log shows the analyst's denials and the auditor's queries")
    page.fill("input[name=user]", "alan")
    page.click("form.filters button[type=submit]")
    until(page, "() => [...document.querySelectorAll('table.audit tbody tr td:nth-child(2)')].every(td => td.textContent === 'alan')")
    check("user=alan" in page.url, "the audit filter is in the URL")
    shot(page, "7-audit")

    # Keyboard: a lineage node opens the SQL editor on Enter.
    go(page, "#/lineage/finance/payments")
    page.focus("svg.lineage g.node[data-layer=gold]")
    page.keyboard.press("Enter")
    page.wait_for_selector("#sql-out .count")
    check("gold.finance.revenue_by_country_hourly" in page.input_value("#sql-text"), "Enter on a gold node queries it")

    measure(browser, log)

    check(not log["foreign"], f"no request left the catalog: {log['foreign'][:5]}")
    check(not log["errors"], f"no console error: {log['errors'][:5]}")
    ctx.close()


def measure(browser, log):
    # Page weight: a fresh context (empty cache), signed in by link, the list rendered.
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    page = ctx.new_page()
    watch(page, log)
    page.goto(f"{URL}/#token={ADMIN}")
    until(page, "() => performance.getEntriesByName('products-rendered').length > 0")
    n = page.locator("table.products tbody tr").count()
    entries = page.evaluate("""() => {
        const n = performance.getEntriesByType('navigation')[0];
        return [n, ...performance.getEntriesByType('resource')].map(e => ({name: e.name, transfer: e.transferSize, body: e.decodedBodySize}));
    }""")
    assets = [e for e in entries if "/v1/" not in e["name"]]
    api = [e for e in entries if "/v1/" in e["name"]]
    kb = lambda es, k: sum(e[k] for e in es) / 1024
    print(f"MEASURE page weight, first load: UI {kb(assets, 'transfer'):.1f} KB transferred in {len(assets)} files "
          f"({kb(assets, 'body'):.1f} KB uncompressed); API JSON for {n} products {kb(api, 'transfer'):.1f} KB; "
          f"total {kb(entries, 'transfer'):.1f} KB", flush=True)

    # First render of the list with 200+ products: navigation start → rendered.
    times = []
    for _ in range(5):
        page.reload()
        until(page, "() => performance.getEntriesByName('products-rendered').length > 0")
        times.append(page.evaluate("performance.getEntriesByName('products-rendered')[0].startTime"))
        assert page.locator("table.products tbody tr").count() >= BULK
    print(f"MEASURE product list ({n} products), navigation start → rendered: median {statistics.median(times):.0f} ms "
          f"(min {min(times):.0f}, max {max(times):.0f}, 5 loads)", flush=True)
    shot(page, "8-products-200")

    # The lineage graph of lab.wide: route change → SVG in the page.
    times = []
    for _ in range(5):
        go(page, "#/products")
        t = page.evaluate("""() => new Promise(done => {
            performance.clearMarks('lineage-rendered');
            const t0 = performance.now();
            location.hash = '#/lineage/lab/wide';
            const wait = () => {
                const m = performance.getEntriesByName('lineage-rendered');
                if (m.length) requestAnimationFrame(() => done(performance.now() - t0)); else setTimeout(wait, 1);
            };
            wait();
        })""")
        times.append(t)
    nodes = page.locator("svg.lineage g.node").count()
    check(nodes == 4 + 2 * WIDE_GOLD, f"the wide product's graph has {nodes} nodes")
    print(f"MEASURE lineage graph with {nodes} nodes ({page.locator('svg.lineage path.edge').count()} edges), "
          f"hash change → drawn (incl. the API call): median {statistics.median(times):.0f} ms (min {min(times):.0f}, max {max(times):.0f})",
          flush=True)
    shot(page, "9-lineage-50-nodes")
    ctx.close()


if __name__ == "__main__":
    main()
