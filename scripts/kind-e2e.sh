#!/usr/bin/env bash
# End-to-end on a throwaway kind cluster: build the image, install NATS and
# the chart with the DataProduct controller on, apply the example resource,
# wait until it is Ready, run `helm test`. Needs docker, kind, kubectl, helm.
# (CI runs scripts/k8s-e2e instead: the same checks without kind, on a
# Kubernetes built from Debian's sources; this one is for a developer machine.)
set -euo pipefail
cd "$(dirname "$0")/.."

cluster="${KIND_CLUSTER:-medallion-e2e}"
image="medallion:e2e"
ns=medallion
keep="${KEEP_CLUSTER:-0}"

for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null || { echo "kind-e2e needs $tool on PATH" >&2; exit 2; }
done

cleanup() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "--- failed; state of the cluster:" >&2
        kubectl -n "$ns" get pods,dataproducts -o wide >&2 || true
        kubectl -n "$ns" logs deploy/medallion-medallion-catalog --tail=100 >&2 || true
    fi
    if [ "$keep" != 1 ]; then kind delete cluster --name "$cluster" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

echo "--- image"
DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile -t "$image" .

echo "--- cluster"
kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster" --wait 120s
kind load docker-image "$image" --name "$cluster"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -

echo "--- NATS with JetStream (official chart)"
helm repo add nats https://nats-io.github.io/k8s/helm/charts/ >/dev/null
helm upgrade --install nats nats/nats -n "$ns" --wait --timeout 5m \
    --set config.jetstream.enabled=true \
    --set config.jetstream.fileStore.pvc.size=1Gi

echo "--- secrets and Medallion"
kubectl -n "$ns" create secret generic medallion-secrets \
    --from-literal=MEDALLION_PII_KEY="$(openssl rand -hex 32)" \
    --from-literal=MEDALLION_JWT_SECRET="$(openssl rand -hex 32)" \
    --dry-run=client -o yaml | kubectl apply -f -
# kind's storage class is ReadWriteOnce only; its one node runs every pod,
# so an RWO lake volume works here. Production uses s3:// or an RWX class.
helm upgrade --install medallion charts/medallion -n "$ns" --wait --timeout 10m \
    --set image.repository=medallion --set image.tag=e2e --set image.pullPolicy=Never \
    --set nats.url=nats://nats:4222 \
    --set lake.persistence.accessMode=ReadWriteOnce \
    --set kubeController.enabled=true \
    --set services.catalog.replicas=1 \
    --set grafana.dashboard.enabled=false

echo "--- DataProduct resource"
kubectl -n "$ns" apply -f charts/medallion/examples/dataproduct.yaml
kubectl -n "$ns" wait dataproduct/card-payments --for=condition=Ready --timeout=120s
kubectl -n "$ns" get dataproducts

echo "--- an invalid resource is reported, not registered"
sed -e 's/name: card-payments/name: broken-payments/' -e 's/type: float64/type: money/' \
    charts/medallion/examples/dataproduct.yaml | kubectl -n "$ns" apply -f -
kubectl -n "$ns" wait dataproduct/broken-payments --for=condition=Invalid --timeout=60s
kubectl -n "$ns" delete dataproduct/broken-payments --wait --timeout=60s

echo "--- helm test"
helm test medallion -n "$ns" --logs

echo "--- deleting the resource unregisters the product (the finalizer is released)"
kubectl -n "$ns" delete dataproduct/card-payments --wait --timeout=60s
echo "kind-e2e: ok"
