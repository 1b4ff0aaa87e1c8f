"""Lints the Helm chart with the real Helm v4 library (helm-sdkpy): CI has no helm binary."""

import asyncio
import json
import sys

import helm_sdkpy

# Helm's support.Severity: 1 info, 2 warning, 3 error.
ERROR = 3


def main(chart: str) -> int:
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
