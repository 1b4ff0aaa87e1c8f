"""What the benchmark harnesses share: free ports, a throwaway nats-server,
latency quantiles from a service's /metrics, and results appended to
docs/benchmarks.md."""

import os
import resource
import shutil
import socket
import subprocess
import time
import urllib.request

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start_nats(tmp):
    """A nats-server with JetStream on a free port, its store under `tmp`; returns (process, url)."""
    port = free_port()
    server = subprocess.Popen([shutil.which("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", os.path.join(tmp, "js")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    return server, f"nats://127.0.0.1:{port}"


def latency_quantiles(metrics_url, layer):
    """p50 and p99 (as histogram bucket bounds) of publish→commit for `layer`."""
    text = urllib.request.urlopen(metrics_url).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("medallion_publish_to_commit_seconds_bucket") and f'layer="{layer}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None, None
    total = buckets[-1][1]
    q = lambda f: next(le for le, c in buckets if c >= f * total)
    return q(0.5), q(0.99)


def committed(metrics_url, layer, product):
    """Rows a service has committed to `layer` for `product` (its own
    `medallion_rows_out_total`): a poll that costs the service one small
    HTTP answer, where reading the table would compete with it for CPU."""
    text = urllib.request.urlopen(metrics_url).read().decode()
    for line in text.splitlines():
        if line.startswith("medallion_rows_out_total") and f'layer="{layer}"' in line and f'product="{product}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def last_write_at(path):
    """Epoch seconds of a Delta table's last data commit, by its own log's
    clock: exact where a poll is only as fine as its interval."""
    import deltalake
    t = deltalake.DeltaTable(path)
    return max(h["timestamp"] for h in t.history() if h.get("operation") in ("WRITE", "MERGE", "CREATE TABLE")) / 1000


def append_results(text):
    print(text)
    with open(DOCS, "a") as f:
        f.write(text)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """user + system CPU seconds of a running process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime
