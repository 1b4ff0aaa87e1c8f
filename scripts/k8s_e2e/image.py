"""The Medallion image, built with a real engine (dockerd, BuildKit) from
docker/Dockerfile with a base made locally by mmdebstrap (no image registry
is reachable here), then tried: every binary starts, and medallion-ingest in
a container lands Bronze from a nats-server on this machine.

dockerd runs with --bridge=none --iptables=false: no bridge, no iptables
rule; containers use the host's network (loopback only here)."""

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time

from common import (CACHE, DOCKER, ROOT, TARGET, TIMINGS, Failed, Procs, check, free_port, log, run,
                    timed, unmount_under, wait_tcp, wait_until)

BASE_TAG = "medallion-base/bookworm:minbase"
BINARIES = ["medallion", "medallion-ingest", "medallion-transform", "medallion-aggregate", "medallion-catalog"]


def app_version() -> str:
    for line in open(os.path.join(ROOT, "charts/medallion/Chart.yaml")):
        if line.startswith("appVersion:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise Failed("no appVersion in Chart.yaml")


def image_ref() -> str:
    return f"medallion:{app_version()}"


class Docker:
    """A dockerd of our own: data root in the cache (warm builds reuse its
    layers), sockets in the run dir, no bridge and no iptables rules."""

    def __init__(self, procs: Procs, run_dir: str):
        self.data = os.path.join(CACHE, "docker")
        # exec-root and the socket path must stay short (unix socket limit).
        self.exec_root = tempfile.mkdtemp(prefix="mdk-", dir="/run")
        self.sock = os.path.join(self.exec_root, "docker.sock")
        self.host = f"unix://{self.sock}"
        os.makedirs(self.data, exist_ok=True)
        self.procs = procs
        self.proc = procs.start("dockerd", [
            "dockerd", "--data-root", self.data, "--exec-root", self.exec_root, "-H", self.host,
            "--pidfile", os.path.join(self.exec_root, "docker.pid"),
            "--bridge=none", "--iptables=false", "--ip-forward=false", "--ip-masq=false",
            "--userland-proxy=false", "--storage-driver=overlay2"])
        wait_until("dockerd", lambda: self.cli(["version"], check_rc=False, timeout=10).returncode == 0, 60)

    def cli(self, args, timeout: float = 600, check_rc: bool = True, capture: bool = True, **kw):
        env = dict(os.environ, DOCKER_HOST=self.host, DOCKER_BUILDKIT="1")
        return run([DOCKER, *args], timeout=timeout, check_rc=check_rc, capture=capture, env=env, **kw)

    def stop(self) -> None:
        self.procs.stop(self.proc, grace=20)
        unmount_under(self.exec_root)
        unmount_under(self.data)
        shutil.rmtree(self.exec_root, ignore_errors=True)


def base_tar() -> str:
    """A minimal Debian bookworm root (with curl and CA certificates, so the
    image build needs no package mirror), made once and cached."""
    out = os.path.join(CACHE, "images", "base-bookworm.tar")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = out + ".part.tar"
        with timed("base image (mmdebstrap)"):
            run(["mmdebstrap", "--variant=minbase", "--include=ca-certificates,curl", "--format=tar",
                 "bookworm", tmp, "http://deb.debian.org/debian"], timeout=900, capture=True)
        os.rename(tmp, out)
    return out


def ensure_base(docker: Docker) -> None:
    tar = base_tar()
    stamp = str(int(os.path.getmtime(tar)))
    have = docker.cli(["image", "inspect", "-f", "{{index .Config.Labels \"medallion.base\"}}", BASE_TAG],
                      check_rc=False)
    if have.returncode == 0 and have.stdout.strip() == stamp:
        return
    docker.cli(["import", "--change", f"LABEL medallion.base={stamp}", "--change", 'CMD ["bash"]', tar, BASE_TAG],
               timeout=300)


def prebuilt_context() -> str:
    """The build context for BINARIES=prebuilt: bin/ (the cargo-built
    binaries, debug info stripped) and products/."""
    ctx = os.path.join(CACHE, "image-context")
    bindir = os.path.join(ctx, "bin")
    os.makedirs(bindir, exist_ok=True)
    profile = os.environ.get("MEDALLION_PROFILE", "debug")
    for b in BINARIES:
        src = os.path.join(TARGET, profile, b)
        check(os.path.exists(src), f"{src} is missing: build the workspace first (cargo build --workspace)")
        dst = os.path.join(bindir, b)
        if not os.path.exists(dst) or os.path.getmtime(dst) < os.path.getmtime(src):
            # Debug info only (symbols stay, so backtraces still name functions).
            run(["objcopy", "--strip-debug", src, dst + ".tmp"], timeout=300)
            os.replace(dst + ".tmp", dst)
            os.utime(dst, (os.path.getmtime(src),) * 2)
    products = os.path.join(ctx, "products")
    shutil.rmtree(products, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "products"), products)
    return ctx


def build(docker: Docker, label: str) -> None:
    base_tar()  # made once (mmdebstrap, ~80 s), timed on its own
    # Timed: importing the base, staging the binaries (debug info stripped)
    # and the BuildKit build.
    with timed(f"image build ({label})"):
        ensure_base(docker)
        ctx = prebuilt_context()
        # --network none: the base has curl and CA certificates, so the
        # build needs no network (and this dockerd has no bridge anyway).
        docker.cli(["build", "--network", "none", "-f", os.path.join(ROOT, "docker/Dockerfile"),
                    "--build-arg", "BINARIES=prebuilt", "--build-arg", f"RUNTIME_IMAGE={BASE_TAG}",
                    "--build-arg", f"VERSION={app_version()}", "-t", image_ref(), ctx], timeout=900)
    # Each build leaves the previous image untagged and its layers in the
    # build cache (about 1 GB a run): drop them, keeping a warm cache.
    docker.cli(["image", "prune", "-f"], check_rc=False, timeout=300)
    docker.cli(["builder", "prune", "-f", "--keep-storage", "4GB"], check_rc=False, timeout=300)


def measure(docker: Docker) -> None:
    size = int(docker.cli(["image", "inspect", "-f", "{{.Size}}", image_ref()]).stdout.strip())
    TIMINGS["image size on disk (MB)"] = round(size / 1e6, 1)
    r = run(f"{DOCKER} save {image_ref()} | gzip -1 | wc -c", capture=True, timeout=600,
            env=dict(os.environ, DOCKER_HOST=docker.host))
    TIMINGS["image size gzip (MB)"] = round(int(r.stdout.strip()) / 1e6, 1)
    log(f"image {image_ref()}: {TIMINGS['image size on disk (MB)']} MB on disk, "
        f"{TIMINGS['image size gzip (MB)']} MB gzip")


def binaries_start(docker: Docker) -> None:
    img = image_ref()
    out = docker.cli(["run", "--rm", "--network", "none", img, "medallion", "--help"]).stdout
    check("publish" in out, f"medallion --help: {out[:500]}")
    for b in BINARIES[1:]:
        # A service checks its whole configuration before doing anything: a
        # misspelt setting makes it exit 2 naming it, which proves the binary
        # loads and runs in the image.
        r = docker.cli(["run", "--rm", "--network", "none", "-e", "MEDALLION_LAKEE=/x", img, b], check_rc=False,
                       timeout=60)
        check(r.returncode == 2 and "MEDALLION_LAKEE" in r.stderr,
              f"{b} in the image: exit {r.returncode}: {r.stderr[-800:]}")
    log("every binary starts in the image")


def ingest_lands_bronze(docker: Docker, procs: Procs, run_dir: str) -> None:
    """medallion-ingest in a container (host network: loopback) lands Bronze
    for the bundled payments product from a nats-server on this machine."""
    port, health = free_port(), free_port()
    store = os.path.join(run_dir, "nats-image")
    nats = procs.start("nats-image", ["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store])
    wait_tcp(port, "nats-server")
    lake = os.path.join(run_dir, "lake-image")
    os.makedirs(lake)
    os.chmod(lake, 0o777)
    nats_url = f"nats://127.0.0.1:{port}"
    name = f"medallion-ingest-e2e-{os.getpid()}"
    img = image_ref()
    ingest = procs.start("ingest-container", [
        DOCKER, "-H", docker.host, "run", "--rm", "--name", name, "--network", "host", "--read-only",
        "-v", f"{lake}:/lake", "-e", f"NATS_URL={nats_url}", "-e", "MEDALLION_LAKE=/lake",
        "-e", "MEDALLION_SPEC_SOURCE=folder", "-e", f"MEDALLION_INGEST_ADDR=127.0.0.1:{health}",
        "-e", "MEDALLION_BATCH_WAIT=100ms", img, "medallion-ingest"])
    try:
        import urllib.request
        wait_until("ingest in the container is ready",
                   lambda: urllib.request.urlopen(f"http://127.0.0.1:{health}/readyz", timeout=2).status == 200, 90)
        events = "".join(json.dumps({"event_id": f"img-{i}", "ts": "2026-12-01T10:00:00Z", "user_id": f"u{i}",
                                     "amount": 1.5 + i, "currency": "eur", "country": "FR"}) + "\n"
                         for i in range(100))
        docker.cli(["run", "--rm", "-i", "--network", "host", "-e", f"NATS_URL={nats_url}", img,
                    "medallion", "publish", "finance.payments", "--lines", "10"], input=events, timeout=60)

        def bronze_rows():
            from deltalake import DeltaTable
            path = os.path.join(lake, "bronze", "finance", "payments")
            if not os.path.isdir(os.path.join(path, "_delta_log")):
                return 0
            return DeltaTable(path).to_pyarrow_table().num_rows
        wait_until("Bronze rows from the container", lambda: bronze_rows() >= 10, 60)
        rows = bronze_rows()
        log(f"medallion-ingest in the container landed Bronze ({rows} messages)")
    finally:
        docker.cli(["stop", "-t", "10", name], check_rc=False, timeout=30)
        procs.stop(ingest)
        procs.stop(nats)


def step(procs: Procs, run_dir: str) -> Docker:
    """Builds and tries the image; returns the running dockerd (the pods step
    exports the image from it)."""
    docker = Docker(procs, run_dir)
    cold = docker.cli(["image", "inspect", image_ref()], check_rc=False).returncode != 0
    build(docker, "cold" if cold else "warm")
    measure(docker)
    binaries_start(docker)
    ingest_lands_bronze(docker, procs, run_dir)
    return docker
