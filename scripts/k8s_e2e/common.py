"""What the k8s-e2e steps share: the cache outside the clone, processes that
are always cleaned up, bounded waits, timings."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# Build products (Kubernetes binaries, the base image, the Docker data root)
# live outside the clone, like the cargo target dir, so a warm run reuses them.
CACHE = os.environ.get("MEDALLION_K8S_CACHE", os.path.expanduser("~/.cache/medallion-k8s"))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/medallion-target"))
KUBE_VERSION = "1.20.2"
DOCKER = "/usr/bin/docker"  # Debian's client: BuildKit built in (no buildx plugin needed)

TIMINGS: dict = {}


def log(msg: str) -> None:
    print(f"[k8s-e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Failed(Exception):
    pass


def check(cond, msg: str) -> None:
    if not cond:
        raise Failed(msg)


def run(cmd, timeout: float = 600, check_rc: bool = True, capture: bool = False, env=None, cwd=None, input=None):
    """Runs a command to completion within `timeout` seconds."""
    shown = cmd if isinstance(cmd, str) else " ".join(map(str, cmd))
    r = subprocess.run(cmd, shell=isinstance(cmd, str), timeout=timeout, env=env, cwd=cwd, input=input,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.PIPE if capture else None, text=True)
    if check_rc and r.returncode != 0:
        raise Failed(f"`{shown[:300]}` exited {r.returncode}\n{(r.stdout or '')[-2000:]}{(r.stderr or '')[-3000:]}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, what: str, timeout: float = 30) -> None:
    def accepts():
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    wait_until(what, accepts, timeout, 0.1)


def wait_until(what: str, fn, timeout: float, interval: float = 0.5):
    """Polls `fn` until it returns something truthy; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - a poll may fail until ready
            last = e
        time.sleep(interval)
    raise Failed(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))


@contextlib.contextmanager
def timed(name: str):
    t = time.monotonic()
    yield
    TIMINGS[name] = round(time.monotonic() - t, 1)
    log(f"{name}: {TIMINGS[name]} s")


class Procs:
    """Every long-running process a step starts, each in its own process
    group, stopped (TERM, then KILL) in reverse order when the step ends,
    whatever happened. Daemons that re-parent their children (container
    shims) are found by a marker in their command line (our run dir) and
    stopped the same way."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.procs: list = []

    def start(self, name: str, cmd, env=None, cwd=None) -> subprocess.Popen:
        logf = open(os.path.join(self.run_dir, f"{name}.log"), "ab")
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=True)
        p.name = name  # type: ignore[attr-defined]
        p.logfile = logf.name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def alive(self, p) -> bool:
        return p.poll() is None

    def tail(self, p, n: int = 40) -> str:
        try:
            with open(p.logfile, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, p, grace: float = 10) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()
        kill_marked(self.run_dir)


def kill_marked(marker: str) -> None:
    """Kills processes whose command line names `marker` (our run dir), and
    their descendants: re-parented daemons such as containerd shims."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(pid))
    for pid in pids + [d for p in pids for d in descendants(p)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list:
    children: dict = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def unmount_under(path: str) -> None:
    """Unmounts everything mounted below `path` (deepest first)."""
    path = os.path.realpath(path)
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = line.split()[1].replace("\\040", " ")
            if target == path or target.startswith(path + "/"):
                mounts.append(target)
    for m in sorted(set(mounts), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)


def pip_bin(name: str) -> str:
    import shutil
    import sysconfig
    found = shutil.which(name) or os.path.join(sysconfig.get_path("scripts"), name)
    return found


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)[:4000]


def main_guard(fn) -> None:
    """Runs `fn`, turning SIGTERM/SIGINT into a clean failure so every
    `finally` (process and network cleanup) runs."""
    def on_signal(signum, _frame):
        raise Failed(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        fn()
    except Failed as e:
        log(f"FAILED: {e}")
        sys.exit(1)
