"""The catalog's DataProduct controller against the real API server: the
medallion-catalog binary with MEDALLION_KUBE_CONTROLLER=true and a
kubeconfig reconciles real DataProduct resources — Ready and Invalid
conditions, the finalizer, a breaking change waiting for the full-refresh
annotation, delete — the cases of services/catalog/tests/controller.rs,
against a real API server instead of the in-process fake."""

import base64
import copy
import hashlib
import hmac
import json
import os
import time
import urllib.error
import urllib.request

from common import TARGET, Procs, check, free_port, log, wait_tcp, wait_until
from cluster import ControlPlane

NS = "e2e-controller"
FINALIZER = "medallion.dev/registry"
PLURAL = f"/apis/medallion.dev/v1alpha1/namespaces/{NS}/dataproducts"


def hs256(secret: str, claims: dict) -> str:
    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(hmac.new(secret.encode(), head.encode(), hashlib.sha256).digest())


def resource(name: str, schema: list, annotations: dict) -> dict:
    return {
        "apiVersion": "medallion.dev/v1alpha1", "kind": "DataProduct",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "domain": "shop", "owner": "shop-team@example.com", "source": {"format": "ndjson"},
            "schema": schema, "key": ["order_id"],
            "gold": [{"name": "orders_by_qty", "sql": "SELECT qty, count(*) AS orders FROM silver GROUP BY qty"}],
            "access": [{"role": "analyst", "layers": ["gold"]}], "sla": {"freshness": "60s"},
        },
    }


V1 = [{"name": "order_id", "type": "string", "required": True}, {"name": "qty", "type": "int64"}]


def step(cp: ControlPlane, procs: Procs, run_dir: str) -> None:
    api = cp.api
    from helm_steps import ensure_namespace
    ensure_namespace(api, NS)
    d = os.path.join(run_dir, "controller")
    os.makedirs(os.path.join(d, "products"))
    kubeconfig = os.path.join(d, "kubeconfig")
    kc = json.load(open(cp.kubeconfig))
    kc["contexts"][0]["context"]["namespace"] = NS
    json.dump(kc, open(kubeconfig, "w"))
    nats_port, http_port = free_port(), free_port()
    procs.start("nats-controller", ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                                    "-sd", os.path.join(d, "nats")])
    wait_tcp(nats_port, "nats-server")
    secret = os.urandom(24).hex()
    env = {
        "PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "KUBECONFIG": kubeconfig,
        "NATS_URL": f"nats://127.0.0.1:{nats_port}", "MEDALLION_LAKE": os.path.join(d, "lake"),
        "MEDALLION_PRODUCTS": os.path.join(d, "products"), "MEDALLION_JWT_SECRET": secret,
        "MEDALLION_PII_KEY": os.urandom(16).hex(), "MEDALLION_CATALOG_ADDR": f"127.0.0.1:{http_port}",
        "MEDALLION_KUBE_CONTROLLER": "true", "MEDALLION_LOG_FORMAT": "text",
        "MEDALLION_LOG": "info,deltalake_core=warn,kube=info",
    }
    catalog = procs.start("catalog-controller", [os.path.join(TARGET, "debug", "medallion-catalog")], env=env)
    token = hs256(secret, {"sub": "e2e", "exp": int(time.time()) + 3600, "roles": ["admin"]})

    def product(name: str):
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/products/shop/{name}",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def alive():
        check(catalog.poll() is None, "medallion-catalog exited:\n" + procs.tail(catalog))
        return True

    def ready_catalog():
        alive()
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
            return r.status == 200
    wait_until("the catalog is ready", ready_catalog, 60)

    def obj(name):
        return api.get(f"{PLURAL}/{name}")

    def condition(name, type_):
        o = obj(name) or {}
        for c in (o.get("status") or {}).get("conditions", []):
            if c["type"] == type_:
                return c
        return {}

    def until_condition(name, type_, status, reason=None, timeout=30):
        def ok():
            alive()
            c = condition(name, type_)
            o = obj(name) or {}
            return (c.get("status") == status and (reason is None or c.get("reason") == reason)
                    and (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"]) and c
        return wait_until(f"{name}: {type_}={status}{' ' + reason if reason else ''}", ok, timeout)

    def apply(body):
        name = body["metadata"]["name"]
        cur = obj(name)
        if cur is None:
            api.must("POST", PLURAL, body)
        else:
            body = copy.deepcopy(body)
            body["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
            body["metadata"]["finalizers"] = cur["metadata"].get("finalizers")
            body["status"] = cur.get("status")
            api.must("PUT", f"{PLURAL}/{name}", body)

    # A valid resource: registered and Ready, with our finalizer.
    t0 = time.monotonic()
    apply(resource("web-orders", V1, {}))
    ready = until_condition("web-orders", "Ready", "True", "Registered")
    took = time.monotonic() - t0
    stored = obj("web-orders")
    check(stored["metadata"].get("finalizers") == [FINALIZER], f"finalizers {stored['metadata']}")
    check(condition("web-orders", "Invalid").get("status") == "False", "Invalid is False")
    check(stored["status"]["product"] == "shop.web_orders", f"status {stored['status']}")
    check(product("web_orders") is not None, "web_orders registered in the catalog")
    log(f"valid DataProduct Ready ({ready['reason']}) in {took:.1f} s, finalizer {FINALIZER}, registered")

    # An invalid resource (the CRD's schema allows any type string; the
    # catalog's compiler does not): Invalid, nothing registered.
    apply(resource("bad-orders", [{"name": "order_id", "type": "string", "required": True},
                                  {"name": "qty", "type": "integer"}], {}))
    invalid = until_condition("bad-orders", "Invalid", "True")
    check("spec.schema[1].type" in invalid["message"] and "integer" in invalid["message"], f"{invalid}")
    check(condition("bad-orders", "Ready").get("status") == "False", "bad-orders not Ready")
    check(product("bad_orders") is None, "bad_orders not registered")
    log(f"invalid DataProduct: Invalid=True ({invalid['message'][:100]})")

    # A breaking change waits for the full-refresh annotation.
    apply(resource("orders", V1, {}))
    until_condition("orders", "Ready", "True", "Registered")
    rev1 = product("orders")["revision"]
    retyped = [{"name": "order_id", "type": "string", "required": True}, {"name": "qty", "type": "string"}]
    apply(resource("orders", retyped, {}))
    ready = until_condition("orders", "Ready", "False", "BreakingChange")
    check("qty" in ready["message"] and "medallion.dev/full-refresh" in ready["message"], f"{ready}")
    p = product("orders")
    check(p["revision"] == rev1 and "int64" in json.dumps(p["spec"]), "the registered version stays")
    apply(resource("orders", retyped, {"medallion.dev/full-refresh": "true"}))
    until_condition("orders", "Ready", "True")
    p = wait_until("orders revision 2", lambda: (lambda p: p if p and p["revision"] > rev1 else None)(
        product("orders")), 30)
    check("int64" not in json.dumps(p["spec"]), f"the retyped spec registered: {p['spec']}")
    log(f"breaking change: BreakingChange until annotated, then revision {rev1} -> {p['revision']}")

    # Delete: the finalizer holds the object until the product is unregistered.
    api.must("DELETE", f"{PLURAL}/orders")
    wait_until("orders deleted (finalizer released)", lambda: obj("orders") is None, 30)
    check(product("orders") is None, "orders unregistered")
    for name in ("web-orders", "bad-orders"):
        api.must("DELETE", f"{PLURAL}/{name}")
    wait_until("every DataProduct gone", lambda: not api.names(PLURAL), 30)
    check(product("web_orders") is None, "web_orders unregistered")
    log("delete: unregistered, finalizer released, objects gone")
    procs.stop(catalog)
