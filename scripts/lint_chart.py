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


def main(chart: str) -> int:
    missing = dashboard_metrics_exist(chart)
    if missing:
        print("dashboard queries metrics nobody exports:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(chart))
    print(json.dumps(result, indent=2))
    messages = result.get("Messages") or []
    errors = [m for m in messages if m.get("Severity", 0) >= ERROR]
    if errors or result.get("Errors"):
        print(f"helm lint: {len(errors)} error(s) in {chart}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
