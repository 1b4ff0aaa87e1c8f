"""The chart installed with the real Helm v4 library (helm-sdkpy) on the real
API server: default values, ci/all-features-values.yaml, an upgrade with
changed values, a rollback and uninstalls, checking what the API server
holds; the CRD served, a good DataProduct accepted and bad ones refused by
its schema."""

import asyncio
import copy
import os
import time

import helm_sdkpy
import yaml

from common import ROOT, TIMINGS, check, log, wait_until
from cluster import Api, ControlPlane

CHART = os.path.join(ROOT, "charts", "medallion")
STAGES = ["ingest", "transform", "aggregate"]
COMPONENTS = STAGES + ["catalog"]


def helm(cp: ControlPlane, ns: str):
    return helm_sdkpy.Configuration(namespace=ns, kubeconfig=cp.kubeconfig)


def install(cp, ns, release, values, wait=False, timeout=300):
    return asyncio.run(helm_sdkpy.Install(helm(cp, ns)).run(release, CHART, values=values, wait=wait,
                                                            timeout=timeout, create_namespace=True))


def upgrade(cp, ns, release, values, wait=False, timeout=300):
    return asyncio.run(helm_sdkpy.Upgrade(helm(cp, ns)).run(release, CHART, values=values, wait=wait,
                                                            timeout=timeout))


def helm_python(cp: ControlPlane, ns: str):
    # helm-sdkpy 0.1.32's rollback fails ("wait strategy not set") and it
    # has no options to pass one: rollback and test go through PyPI's
    # helm-python-sdk (the same Helm v4 library, other bindings).
    import helm_python
    return helm_python.Config(kubeconfig_path=cp.kubeconfig, namespace=ns)


def rollback(cp, ns, release, revision):
    helm_python(cp, ns).rollback(release, version=revision, wait="hookOnly", timeout=120)


def test(cp, ns, release, timeout=120):
    return helm_python(cp, ns).test(release, timeout=timeout, logs=True)


def uninstall(cp, ns, release, wait=False):
    return asyncio.run(helm_sdkpy.Uninstall(helm(cp, ns)).run(release, wait=wait, timeout=120))


def history(cp, ns, release):
    return asyncio.run(helm_sdkpy.History(helm(cp, ns)).run(release))


def ensure_namespace(api: Api, ns: str) -> None:
    status, _ = api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": ns}})
    check(status in (201, 409), f"namespace {ns}: {status}")


def secrets(api: Api, ns: str) -> str:
    """The chart's secret; returns the JWT secret (to mint admin tokens)."""
    jwt = os.urandom(24).hex()
    status, body = api.call("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "medallion-secrets"},
        "stringData": {"MEDALLION_PII_KEY": os.urandom(16).hex(), "MEDALLION_JWT_SECRET": jwt}})
    check(status in (201, 409), f"secret: {status} {body}")
    return jwt


def fullname(release: str) -> str:
    return f"{release}-medallion"[:63].rstrip("-")


def deployment(api, ns, release, comp):
    return api.get(f"/apis/apps/v1/namespaces/{ns}/deployments/{fullname(release)}-{comp}")


def env_of(dep) -> dict:
    c = dep["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def expected_objects(release: str, values: dict) -> dict:
    """API path → names the release must create."""
    f = fullname(release)
    out = {
        "/apis/apps/v1/namespaces/{ns}/deployments": [f"{f}-{c}" for c in COMPONENTS],
        "/api/v1/namespaces/{ns}/services": [f"{f}-catalog"],
        "/api/v1/namespaces/{ns}/configmaps": [f"{f}-products"],
        "/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets":
            [f"{f}-{c}" for c in COMPONENTS if values["services"][c].get("podDisruptionBudget", {}).get("enabled")],
    }
    if values["grafana"]["dashboard"]["enabled"]:
        out["/api/v1/namespaces/{ns}/configmaps"].append(f"{f}-dashboard")
    if values["lake"]["persistence"]["enabled"] and not values["lake"]["location"].startswith("s3://"):
        out["/api/v1/namespaces/{ns}/persistentvolumeclaims"] = [f"{f}-lake"]
    if values["kubeController"]["enabled"]:
        out["/api/v1/namespaces/{ns}/serviceaccounts"] = [f"{f}-catalog"]
        out["/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"] = [f"{f}-catalog"]
        out["/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"] = [f"{f}-catalog"]
    hpa = [f"{f}-{c}" for c in COMPONENTS if values["services"][c].get("autoscaling", {}).get("enabled")]
    if hpa:
        out["/apis/autoscaling/v2beta2/namespaces/{ns}/horizontalpodautoscalers"] = hpa
    keda = [f"{f}-{c}" for c in STAGES if values["services"][c].get("keda", {}).get("enabled")]
    if keda:
        out["/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects"] = keda
    if values["networkPolicy"]["enabled"]:
        out["/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies"] = [f"{f}-{c}" for c in COMPONENTS]
    if values["metrics"]["serviceMonitor"]["enabled"]:
        out["/apis/monitoring.coreos.com/v1/namespaces/{ns}/servicemonitors"] = [f]
        out["/api/v1/namespaces/{ns}/services"].append(f"{f}-metrics")
    return out


def missing_objects(api: Api, ns: str, expected: dict) -> list:
    missing = []
    for path, names in expected.items():
        have = set(api.names(path.format(ns=ns)))
        missing += [f"{path.rsplit('/', 1)[1]}/{n}" for n in names if n not in have]
    return missing


def merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def merged_values(*extra) -> dict:
    values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    for e in extra:
        values = merge(values, copy.deepcopy(e))
    return values


def check_deployments(api, ns, release, values) -> None:
    for comp in COMPONENTS:
        d = deployment(api, ns, release, comp)
        svc = values["services"][comp]
        autoscaled = svc.get("autoscaling", {}).get("enabled") or svc.get("keda", {}).get("enabled")
        if not autoscaled:
            check(d["spec"]["replicas"] == svc["replicas"], f"{comp} replicas {d['spec']['replicas']}")
        check(d["spec"]["strategy"]["type"] == "RollingUpdate", f"{comp} strategy {d['spec']['strategy']}")
        pod = d["spec"]["template"]["spec"]
        check(pod.get("enableServiceLinks") is False, f"{comp}: service links on")
        env = env_of(d)
        if comp in STAGES:
            check(env.get("MEDALLION_REPLICA_ID") == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
                  f"{comp} MEDALLION_REPLICA_ID: {env.get('MEDALLION_REPLICA_ID')}")
            check(env.get("MEDALLION_LEASE_TTL") == values["leases"]["ttl"], f"{comp} lease ttl")
        image = pod["containers"][0]["image"]
        check(image == f"{values['image']['repository']}:{values['image']['tag'] or '0.1.0'}", f"image {image}")


def crd_and_dataproducts(api: Api, ns: str) -> None:
    crd = wait_until("the DataProduct CRD established", lambda: (lambda c: c if c and any(
        x["type"] == "Established" and x["status"] == "True" for x in c.get("status", {}).get("conditions", []))
        else None)(api.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/dataproducts.medallion.dev")), 30)
    check(crd["spec"]["versions"][0]["name"] == "v1alpha1", "CRD version")
    wait_until("dataproducts served", lambda: api.get(f"/apis/medallion.dev/v1alpha1/namespaces/{ns}/dataproducts")
               is not None, 30)
    good = yaml.safe_load(open(os.path.join(CHART, "examples", "dataproduct.yaml")))
    api.must("POST", f"/apis/medallion.dev/v1alpha1/namespaces/{ns}/dataproducts", good)
    stored = api.get(f"/apis/medallion.dev/v1alpha1/namespaces/{ns}/dataproducts/card-payments")
    check(stored and stored["spec"]["domain"] == "finance", f"stored DataProduct {stored}")
    # Defaults come from the CRD's schema.
    check(stored["spec"]["source"]["format"] == "ndjson", "spec.source kept")
    bad_cases = {
        "no-domain": lambda s: s.pop("domain"),
        "bad-pii": lambda s: s["schema"][2].update(pii="encrypt"),
        "too-many-partitions": lambda s: s.update(partitions=99),
        "schema-not-a-list": lambda s: s.update(schema="event_id string"),
    }
    for name, spoil in bad_cases.items():
        bad = copy.deepcopy(good)
        bad["metadata"]["name"] = name
        spoil(bad["spec"])
        status, body = api.call("POST", f"/apis/medallion.dev/v1alpha1/namespaces/{ns}/dataproducts", bad)
        check(status == 422, f"bad DataProduct {name} was not refused: {status} {str(body)[:300]}")
    api.must("DELETE", f"/apis/medallion.dev/v1alpha1/namespaces/{ns}/dataproducts/card-payments")
    log(f"CRD served; a good DataProduct accepted, {len(bad_cases)} bad ones refused (422) by its schema")


def replicasets_made(api: Api, ns: str, release: str) -> None:
    """The controller manager turns Deployments into ReplicaSets and Pods."""
    def made():
        rs = api.get(f"/apis/apps/v1/namespaces/{ns}/replicasets")["items"]
        pods = api.get(f"/api/v1/namespaces/{ns}/pods")["items"]
        comps = {r["metadata"]["labels"].get("app.kubernetes.io/component") for r in rs}
        return set(COMPONENTS) <= comps and len(pods) >= 8
    wait_until("ReplicaSets and Pods from the Deployments", made, 60)


def monitoring_crds(api: Api) -> None:
    """Stand-ins for the CRDs the Prometheus Operator and KEDA install, so the
    all-features release (ServiceMonitor, ScaledObject) has somewhere to go."""
    for group, kind, plural in (("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
                                ("keda.sh", "ScaledObject", "scaledobjects")):
        version = "v1" if group == "monitoring.coreos.com" else "v1alpha1"
        status, body = api.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", {
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": kind + "List"},
                     "versions": [{"name": version, "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                         "type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}})
        check(status in (201, 409), f"CRD {plural}.{group}: {status} {body}")
        wait_until(f"{plural}.{group} served", lambda: api.get(f"/apis/{group}/{version}/{plural}") is not None, 30)


def step(cp: ControlPlane) -> None:
    api = cp.api
    # 1. Default values.
    ns, rel = "e2e-default", "med"
    ensure_namespace(api, ns)
    secrets(api, ns)
    values = merged_values()
    t0 = time.monotonic()
    install(cp, ns, rel, None)
    expected = expected_objects(rel, values)
    wait_until("every object of the default release", lambda: not missing_objects(api, ns, expected), 60, 0.2)
    TIMINGS["helm install -> all objects present (s)"] = round(time.monotonic() - t0, 2)
    check_deployments(api, ns, rel, values)
    pdb = api.get(f"/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets/{fullname(rel)}-ingest")
    check(pdb["spec"].get("maxUnavailable") == 1, f"PDB {pdb['spec']}")
    log(f"default release: {sum(len(v) for v in expected.values())} objects in "
        f"{TIMINGS['helm install -> all objects present (s)']} s")
    replicasets_made(api, ns, rel)
    crd_and_dataproducts(api, ns)

    # 2. Upgrade with changed values, then roll back.
    changed = {"services": {"transform": {"replicas": 3}}, "batch": {"rows": 1000}, "leases": {"ttl": "8s"}}
    upgrade(cp, ns, rel, changed)
    d = deployment(api, ns, rel, "transform")
    check(d["spec"]["replicas"] == 3 and env_of(d)["MEDALLION_BATCH_ROWS"] == "1000"
          and env_of(d)["MEDALLION_LEASE_TTL"] == "8s", "upgrade applied")
    rollback(cp, ns, rel, 1)
    d = deployment(api, ns, rel, "transform")
    check(d["spec"]["replicas"] == 2 and env_of(d)["MEDALLION_BATCH_ROWS"] == "50000", "rollback applied")
    revisions = [h.get("version", h.get("Version")) for h in history(cp, ns, rel)]
    check(len(revisions) == 3, f"history {revisions}")
    log("upgrade (transform 3 replicas, batch.rows 1000, lease 8s) and rollback to revision 1 applied")
    uninstall(cp, ns, rel)
    wait_until("the default release's objects gone", lambda: not api.names(
        f"/apis/apps/v1/namespaces/{ns}/deployments") and not api.names(
        f"/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets"), 60)
    check(api.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/dataproducts.medallion.dev"),
          "the CRD stays after uninstall (Helm never deletes crds/)")
    log("uninstalled: Deployments and PDBs gone, the CRD kept")

    # 3. Every feature on (ci/all-features-values.yaml).
    monitoring_crds(api)
    ns, rel = "e2e-full", "full"
    ensure_namespace(api, ns)
    secrets(api, ns)
    extra = yaml.safe_load(open(os.path.join(CHART, "ci", "all-features-values.yaml")))
    values = merged_values(extra)
    install(cp, ns, rel, extra)
    expected = expected_objects(rel, values)
    wait_until("every object of the all-features release", lambda: not missing_objects(api, ns, expected), 60, 0.2)
    check_deployments(api, ns, rel, values)
    so = api.get(f"/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects/{fullname(rel)}-aggregate")
    trig = so["spec"]["triggers"][0]
    check(trig["type"] == "prometheus" and trig["metadata"]["query"] == 'sum(medallion_unit_backlog{stage="aggregate"})',
          f"ScaledObject trigger {trig}")
    hpa = api.get(f"/apis/autoscaling/v2beta2/namespaces/{ns}/horizontalpodautoscalers/{fullname(rel)}-transform")
    check(hpa["spec"]["maxReplicas"] == 8, f"HPA {hpa['spec']}")
    role = api.get(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{fullname(rel)}-catalog")
    check(any("dataproducts/status" in r["resources"] for r in role["rules"]), f"Role {role['rules']}")
    cat = deployment(api, ns, rel, "catalog")["spec"]["template"]["spec"]
    check(cat.get("serviceAccountName") == f"{fullname(rel)}-catalog", "catalog service account")
    log(f"all-features release: {sum(len(v) for v in expected.values())} objects (RBAC, HPA v2beta2, "
        "ScaledObject, NetworkPolicies, ServiceMonitor, PDBs)")
    uninstall(cp, ns, rel)
    wait_until("the all-features release's objects gone",
               lambda: not api.names(f"/apis/apps/v1/namespaces/{ns}/deployments"), 60)
