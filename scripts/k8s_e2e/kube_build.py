"""Kubernetes 1.20.2 server binaries built from Debian bookworm's
`kubernetes` source package (the whole upstream tree, vendor/ included),
cached outside the clone: a warm run skips all of it.

Bookworm's Go (1.19) needs one fix in the vendored modern-go/reflect2 1.0.1
(Go 1.18 changed reflect.mapiterinit; without it the API server crashes
iterating maps in json-iterator): reflect2-go118.patch, the change released
as reflect2 1.0.2."""

import glob
import os
import shutil

from common import CACHE, KUBE_VERSION, check, log, run, timed

TARGETS = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"]
HERE = os.path.dirname(os.path.abspath(__file__))


def bin_dir() -> str:
    return os.path.join(CACHE, f"bin-v{KUBE_VERSION}")


def ensure() -> str:
    out = bin_dir()
    if all(os.path.exists(os.path.join(out, t)) for t in TARGETS):
        return out
    src_root = os.path.join(CACHE, "src")
    os.makedirs(src_root, exist_ok=True)
    if not glob.glob(os.path.join(src_root, "kubernetes_*.orig.tar.gz")):
        run(["apt-get", "source", "--download-only", "kubernetes"], cwd=src_root, timeout=600, capture=True)
    tree = os.path.join(src_root, f"kubernetes-{KUBE_VERSION}")
    if not os.path.isdir(tree):
        orig = glob.glob(os.path.join(src_root, "kubernetes_*.orig.tar.gz"))[0]
        run(["tar", "xzf", orig], cwd=src_root, timeout=600)
    patch = os.path.join(HERE, "reflect2-go118.patch")
    applied = run(["patch", "-p1", "-R", "--dry-run", "-s", "-f", "-i", patch], cwd=tree, check_rc=False,
                  capture=True).returncode == 0
    if not applied:
        run(["patch", "-p1", "-s", "-i", patch], cwd=tree, timeout=60)
    gopath = os.path.join(tree, ".go")
    os.makedirs(os.path.join(gopath, "src", "k8s.io"), exist_ok=True)
    link = os.path.join(gopath, "src", "k8s.io", "kubernetes")
    if not os.path.islink(link):
        os.symlink("../../..", link)
    env = dict(os.environ, GOPATH=gopath, GOPROXY="off", CGO_ENABLED="0", KUBE_GIT_VERSION=f"v{KUBE_VERSION}",
               GOCACHE=os.path.join(CACHE, "gocache"), GOFLAGS="")
    missing = [t for t in TARGETS if not os.path.exists(os.path.join(tree, "_output", "bin", t))]
    log(f"building {', '.join(missing)} {KUBE_VERSION} from Debian's source package (cold: ~7 min on 2 cores)")
    with timed("kubernetes build"):
        # GOPATH mode through make: a plain `go build -mod=vendor` fails with
        # "updates to go.mod needed". Niced: it shares the machine.
        r = run(["nice", "-n", "19", "make", "WHAT=" + " ".join(f"cmd/{t}" for t in missing)], cwd=tree, env=env,
                timeout=3600, check_rc=False, capture=True)
        if r.returncode != 0:
            # A failed generator step leaves stale state behind.
            shutil.rmtree(os.path.join(tree, ".make"), ignore_errors=True)
            check(False, f"kubernetes build failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    os.makedirs(out, exist_ok=True)
    for t in TARGETS:
        shutil.copy2(os.path.join(tree, "_output", "bin", t), os.path.join(out, t))
    return out
