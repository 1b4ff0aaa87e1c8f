"""A real Kubernetes control plane on loopback: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler 1.20.2 (built from Debian's
source package, see kube_build.py), with temporary certificates and a token,
on free ports. A small JSON client talks to the API server."""

import json
import os
import ssl
import urllib.error
import urllib.request

from common import Failed, Procs, check, free_port, log, run, wait_until


def make_certs(d: str) -> None:
    """A throwaway CA, the API server's serving certificate (127.0.0.1 and
    the in-cluster names), and the service-account signing key."""
    ext = os.path.join(d, "san.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
                "DNS:kubernetes.default,DNS:kubernetes.default.svc\n")
    cmds = [
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=medallion-e2e-ca",
        "openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver",
        "openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt "
        f"-days 2 -extfile {ext}",
        "openssl genrsa -out sa.key 2048",
        "openssl rsa -in sa.key -pubout -out sa.pub",
    ]
    for c in cmds:
        run(c, cwd=d, capture=True, timeout=60)


class Api:
    def __init__(self, server: str, token: str, ca: str):
        self.server = server
        self.token = token
        self.ctx = ssl.create_default_context(cafile=ca)

    def call(self, method: str, path: str, body=None, content_type: str = "application/json", timeout: float = 30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=timeout) as r:
                raw = r.read()
                try:
                    return r.status, json.loads(raw or b"null")
                except ValueError:
                    return r.status, {"raw": raw.decode(errors="replace")}
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"raw": raw.decode(errors="replace")}

    def get(self, path: str):
        status, body = self.call("GET", path)
        return body if status == 200 else None

    def must(self, method: str, path: str, body=None, content_type: str = "application/json"):
        status, out = self.call(method, path, body, content_type)
        check(200 <= status < 300, f"{method} {path}: {status} {json.dumps(out)[:1500]}")
        return out

    def names(self, path: str) -> list:
        body = self.get(path)
        return sorted(i["metadata"]["name"] for i in (body or {}).get("items", []))


class ControlPlane:
    def __init__(self, procs: Procs, run_dir: str, bin_dir: str):
        self.procs = procs
        self.dir = os.path.join(run_dir, "k8s")
        os.makedirs(self.dir)
        self.bin = bin_dir
        make_certs(self.dir)
        self.token = os.urandom(16).hex()
        with open(os.path.join(self.dir, "tokens.csv"), "w") as f:
            f.write(f"{self.token},admin,admin-uid,system:masters\n")
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        self.ca = os.path.join(self.dir, "ca.crt")
        self.kubeconfig = os.path.join(self.dir, "kubeconfig")
        with open(self.kubeconfig, "w") as f:
            json.dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
                "clusters": [{"name": "e2e", "cluster": {"server": self.server, "certificate-authority": self.ca}}],
                "users": [{"name": "admin", "user": {"token": self.token}}],
                "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "admin", "namespace": "default"}}],
            }, f)
        self.api = Api(self.server, self.token, self.ca)

    def k(self, name: str) -> str:
        return os.path.join(self.bin, name)

    def start(self) -> None:
        d = self.dir
        client, peer = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client}"
        self.procs.start("etcd", [
            "etcd", "--data-dir", os.path.join(d, "etcd"), "--listen-client-urls", etcd_url,
            "--advertise-client-urls", etcd_url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}", "--unsafe-no-fsync"])
        apiserver = self.procs.start("kube-apiserver", [
            self.k("kube-apiserver"), f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={d}/apiserver.crt", f"--tls-private-key-file={d}/apiserver.key",
            f"--client-ca-file={d}/ca.crt", f"--token-auth-file={d}/tokens.csv",
            "--authorization-mode=AlwaysAllow", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d}/sa.pub", f"--service-account-signing-key-file={d}/sa.key",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true",
            "--enable-priority-and-fairness=false", "--kubelet-preferred-address-types=InternalIP", "--profiling=false", "--logtostderr=true", "--v=1"])

        def ready():
            check(apiserver.poll() is None, "kube-apiserver exited:\n" + self.procs.tail(apiserver))
            status, body = self.api.call("GET", "/readyz")
            return status == 200
        wait_until("kube-apiserver /readyz", ready, 90)
        self.procs.start("kube-controller-manager", [
            self.k("kube-controller-manager"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--port=0",
            f"--service-account-private-key-file={d}/sa.key", f"--root-ca-file={d}/ca.crt",
            "--use-service-account-credentials=false", "--controllers=*,-nodeipam",
            "--node-monitor-grace-period=20s", "--logtostderr=true", "--v=1"])
        self.procs.start("kube-scheduler", [
            self.k("kube-scheduler"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--port=0", "--logtostderr=true"])
        # The service-account controller makes each namespace's `default`
        # account: a sign the controller manager runs.
        wait_until("the controller manager (default ServiceAccount)",
                   lambda: self.api.get("/api/v1/namespaces/default/serviceaccounts/default"), 60)
        log(f"control plane up at {self.server}")

    def version(self) -> str:
        return self.api.get("/version")["gitVersion"]


def check_running(procs: Procs) -> None:
    for p in procs.procs:
        if p.poll() is not None and p.name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            raise Failed(f"{p.name} exited {p.returncode}:\n{procs.tail(p)}")
