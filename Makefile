# Developer entry points; CI runs ./scripts/test.

.PHONY: test lint-chart crd kind-e2e

test:
	./scripts/test

lint-chart:
	python3 scripts/lint_chart.py charts/medallion

# Regenerates charts/medallion/crds/dataproduct.yaml from the Rust types.
crd:
	UPDATE_CRD=1 cargo test --workspace --test crd

# Needs docker, kind, kubectl and helm (see scripts/kind-e2e.sh).
kind-e2e:
	./scripts/kind-e2e.sh
