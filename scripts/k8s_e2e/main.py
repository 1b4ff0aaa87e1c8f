"""scripts/k8s-e2e: the image built and tried, the chart installed on a real
Kubernetes API server, the DataProduct controller against it, and (unless
K8S_E2E_PODS=0) the platform running in pods. Everything it starts is
stopped, and everything it creates on the machine removed, when it ends."""

import contextlib
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import TIMINGS, Procs, log, main_guard, timed, unmount_under  # noqa: E402


def main() -> None:
    pods_on = os.environ.get("K8S_E2E_PODS", "1") != "0"
    keep = os.environ.get("K8S_E2E_KEEP", "0") == "1"
    run_dir = tempfile.mkdtemp(prefix="medallion-k8s-e2e-")
    procs = Procs(run_dir)
    start = time.monotonic()
    ok = False
    pod_env = None
    try:
        import kube_build
        with timed("kubernetes binaries (build or cache)"):
            bins = kube_build.ensure()
        import image
        docker = image.step(procs, run_dir)
        image_tar = None
        if pods_on:
            import pods
            side = pods.build_side_images(docker)
            image_tar = os.path.join(run_dir, "image.tar")
            docker.cli(["save", "-o", image_tar, image.image_ref(), *side], timeout=600)
        docker.stop()

        import cluster
        cp = cluster.ControlPlane(procs, run_dir, bins)
        with timed("control plane up"):
            cp.start()
        log(f"API server {cp.version()}")
        import helm_steps
        with timed("helm steps (install, upgrade, rollback, uninstall)"):
            helm_steps.step(cp)
        cluster.check_running(procs)
        import controller
        with timed("DataProduct controller against the API server"):
            controller.step(cp, procs, run_dir)
        cluster.check_running(procs)
        if pods_on:
            import pods
            pod_env = pods.PodEnv(procs, run_dir, bins, cp)
            with timed("pods (kubelet, containerd, the platform, helm test, publish to Gold)"):
                pods.step(pod_env, image_tar)
        else:
            log("pods skipped (K8S_E2E_PODS=0)")
        ok = True
    except Exception:
        for p in procs.procs:
            if p.poll() is not None or p.name.startswith("kube"):
                log(f"--- {p.name} (exit {p.poll()}), last lines:\n{procs.tail(p, 25)}")
        raise
    finally:
        if pod_env is not None:
            pod_env.teardown()
        procs.stop_all()
        if pod_env is not None:
            pod_env.teardown_network()
        unmount_under(run_dir)
        # The exported images (~400 MB) are no use for a post-mortem.
        with contextlib.suppress(OSError):
            os.remove(os.path.join(run_dir, "image.tar"))
        if ok and not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            log(f"logs kept in {run_dir}")
        TIMINGS["k8s-e2e wall time (s)"] = round(time.monotonic() - start, 1)
        log("timings: " + ", ".join(f"{k}: {v}" for k, v in TIMINGS.items()))
    log("k8s-e2e passed")


if __name__ == "__main__":
    main_guard(main)
