"""Lints the Helm chart with the real Helm v4 library (helm-sdkpy): CI has no helm binary."""

import asyncio
import json
import os
import re
import sys

import helm_sdkpy

# Helm's support.Severity: 1 info, 2 warning, 3 error.
ERROR = 3


def dashboard_metrics_exist(chart: str) -> list:
    """Every metric the shipped dashboard queries is one the services export."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    exported = set(re.findall(r'"(medallion_[a-z_]+)"', open(os.path.join(root, "crates/medallion-runtime/src/metrics.rs")).read()))
    dash = json.load(open(os.path.join(chart, "dashboards", "medallion.json")))
    missing = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"medallion_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if base not in exported:
                    missing.append(f"{panel['title']}: {name}")
    return missing


def env_names_registered(chart: str) -> list:
    """Every MEDALLION_* variable the templates set is one the services know
    (they refuse unknown MEDALLION_* settings at start)."""
    import glob
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    registry = set(re.findall(r'"(MEDALLION_[A-Z0-9_]+)"', open(os.path.join(root, "crates/medallion-runtime/src/env.rs")).read()))
    unknown = []
    for path in glob.glob(os.path.join(chart, "templates", "**", "*.yaml"), recursive=True) + \
            glob.glob(os.path.join(chart, "ci", "*.yaml")):
        for name in re.findall(r"\b(MEDALLION_[A-Z0-9_]+)\b", open(path).read()):
            if name not in registry:
                unknown.append(f"{os.path.relpath(path, chart)}: {name}")
    return unknown


def lint(chart: str) -> dict:
    return asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart))


def wrong_values_fail(chart: str) -> list:
    """values.schema.json must refuse a wrong value at install time: lint a
    copy of the chart whose values break the schema, and expect errors."""
    import shutil
    import tempfile
    problems = []
    import yaml
    base = yaml.safe_load(open(os.path.join(chart, "values.yaml")))
    for path, value in ((("nats", "streamReplicas"), 2),
                        (("lake", "location"), "relative/path"),
                        (("batch", "wait"), "soon"),
                        (("typo_at_top_level",), True),
                        (("kubeController", "enabled"), "yes"),
                        (("services", "ingest", "replicas"), 0),
                        (("leases", "ttl"), "6 seconds"),
                        # KEDA needs a Prometheus to ask.
                        (("services", "aggregate", "keda"), {"enabled": True}),
                        # An HPA and a ScaledObject would fight over one Deployment.
                        (("services", "transform"), {"autoscaling": {"enabled": True},
                                                     "keda": {"enabled": True, "prometheusAddress": "http://p:9090"}})):
        values = json.loads(json.dumps(base))
        node = values
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "medallion")
            shutil.copytree(chart, copy)
            with open(os.path.join(copy, "values.yaml"), "w") as f:
                yaml.safe_dump(values, f)
            try:
                result = lint(copy)
                refused = bool(result.get("Errors")) or any(m.get("Severity", 0) >= ERROR for m in result.get("Messages") or [])
            except Exception:
                refused = True
            if not refused:
                problems.append(f"{'.'.join(path)}={value!r}")
    return problems


def merge(base, extra):
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def ci_values_lint(chart: str) -> list:
    """Lints the chart with each ci/*-values.yaml merged over the defaults
    (the Lint action takes no values files, so a copy carries them)."""
    import glob
    import shutil
    import tempfile
    import yaml
    failed = []
    for path in sorted(glob.glob(os.path.join(chart, "ci", "*-values.yaml"))):
        values = merge(yaml.safe_load(open(os.path.join(chart, "values.yaml"))), yaml.safe_load(open(path)) or {})
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "medallion")
            shutil.copytree(chart, copy)
            with open(os.path.join(copy, "values.yaml"), "w") as f:
                yaml.safe_dump(values, f)
            result = lint(copy)
            errors = [m for m in result.get("Messages") or [] if m.get("Severity", 0) >= ERROR]
            if errors or result.get("Errors"):
                failed.append(f"{os.path.basename(path)}: {json.dumps(errors or result.get('Errors'))[:400]}")
    return failed


def main(chart: str) -> int:
    broken = ci_values_lint(chart)
    if broken:
        print("helm lint failed with:\n  " + "\n  ".join(broken), file=sys.stderr)
        return 1
    slipped = wrong_values_fail(chart)
    if slipped:
        print("values.schema.json accepted wrong values:\n  " + "\n  ".join(slipped), file=sys.stderr)
        return 1
    unknown = env_names_registered(chart)
    if unknown:
        print("the chart sets settings the services do not know:\n  " + "\n  ".join(unknown), file=sys.stderr)
        return 1
    missing = dashboard_metrics_exist(chart)
    if missing:
        print("dashboard queries metrics nobody exports:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    result = lint(chart)
    print(json.dumps(result, indent=2))
    messages = result.get("Messages") or []
    errors = [m for m in messages if m.get("Severity", 0) >= ERROR]
    if errors or result.get("Errors"):
        print(f"helm lint: {len(errors)} error(s) in {chart}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
