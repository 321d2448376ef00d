"""kubectl direct vs through botwarden, against a real kube-apiserver 1.20.2 (issue 17.9).

Starts etcd + kube-apiserver (tests/k8s/cluster.py), PostgreSQL + OpenBao (the OIDC issuer;
appliance.sandbox) and a botwarden daemon with a Kubernetes target (static upstream token,
the test rules), then times, alternating direct and through botwarden each round:

- ``kubectl get pods -A`` run N times (a fresh kubectl process each: TLS, discovery from the
  cache, one list) - the per-invocation cost a deploy script pays;
- ``kubectl get configmaps -n bench -o json`` over 1,000 ConfigMaps (about 1 MB of JSON).

    sudo .venv/bin/python bench/k8s_compare.py [--count 100] [--rounds 3]

Prints a Markdown table and writes it to bench/results/k8s.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.sandbox import OpenBaoServer, PostgresServer  # noqa: E402
from tests.k8s.cluster import KubeCluster  # noqa: E402
from tests.k8s_fixtures import start_k8s_env  # noqa: E402


def timed(env, kubeconfig: Path, args: tuple[str, ...]) -> float:
    t0 = time.perf_counter()
    res = env.kubectl(kubeconfig, *args, timeout=120)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {res.stderr}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100, help="kubectl get pods -A runs per round and path")
    ap.add_argument("--lists", type=int, default=10, help="1,000-object lists per round and path")
    ap.add_argument("--objects", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    opts = ap.parse_args()
    kube = KubeCluster().start()
    pg = PostgresServer().start()
    bao = OpenBaoServer().start()
    env = None
    try:
        env = start_k8s_env(kube, bao, pg)
        direct = env.direct_kubeconfig()
        kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": "bench"}})

        def make(i: int) -> None:
            kube.request("POST", "/api/v1/namespaces/bench/configmaps",
                         {"metadata": {"name": f"cm-{i:04d}"}, "data": {"k": "v" * 900}})

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(make, range(opts.objects)))
        size = len(env.kubectl(direct, "get", "configmaps", "-n", "bench", "-o", "json").stdout)
        results: dict[str, dict[str, list[float]]] = {"get pods -A": {}, "list": {}}
        for _ in range(opts.rounds):
            bot = env.bot_kubeconfig()  # a fresh token per round (tokens live 10 minutes)
            for path, cfg in (("direct", direct), ("botwarden", bot)):
                timed(env, cfg, ("get", "pods", "-A"))  # discovery cache warm for this kubeconfig
                results["get pods -A"].setdefault(path, []).append(
                    sum(timed(env, cfg, ("get", "pods", "-A")) for _ in range(opts.count)))
                results["list"].setdefault(path, []).append(
                    sum(timed(env, cfg, ("get", "configmaps", "-n", "bench", "-o", "json"))
                        for _ in range(opts.lists)))
        lines = [
            f"# kubectl direct vs through botwarden ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)",
            "",
            f"`bench/k8s_compare.py --count {opts.count} --lists {opts.lists} --rounds {opts.rounds}`; "
            f"kubectl 1.20.2, kube-apiserver 1.20.2 + etcd 3.4 on loopback, {platform.node()}, "
            f"{opts.objects} ConfigMaps = {size / 1e6:.1f} MB of JSON. Seconds per batch, median of rounds "
            "(each kubectl run is a new process: TLS handshake, discovery cache, the request).",
            "",
            "| workload | direct | botwarden | ratio |",
            "|---|---|---|---|",
        ]
        for name, label, n in (("get pods -A", f"`kubectl get pods -A` x{opts.count}", opts.count),
                               ("list", f"`kubectl get configmaps -o json` ({opts.objects} objects) x{opts.lists}",
                                opts.lists)):
            d = statistics.median(results[name]["direct"])
            b = statistics.median(results[name]["botwarden"])
            lines.append(f"| {label} | {d:.2f} s ({d / n * 1000:.0f} ms each) | {b:.2f} s ({b / n * 1000:.0f} ms each) "
                         f"| {b / d:.2f} |")
        lines += ["", "Raw (s per batch): " + json.dumps(results)]
        text = "\n".join(lines) + "\n"
        print(text)
        out = ROOT / "bench" / "results" / "k8s.md"
        out.write_text(text)
        return 0
    finally:
        if env is not None:
            env.daemon.stop()
        bao.stop()
        pg.stop()
        kube.stop()


if __name__ == "__main__":
    raise SystemExit(main())
