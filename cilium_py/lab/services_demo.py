"""The kube-proxy replacement part of `make demo`: the Services of examples/services
applied to the running demo lab, a ClusterIP connected from a pod and a NodePort from
outside the node 30 times each, how the connections spread over the three backends, and
`ciliumpy service list`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cilium_py.lab.lab import Lab

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "services"
CLUSTER_IP = "10.96.100.10"
NODE_PORT = 30080
BACKENDS = ("web/web-1", "web/web-2", "web/web-3")
PROBE = [sys.executable, "-m", "cilium_py.lab.lbprobe"]


def spread(result: dict) -> str:
    """One line per backend with a bar, then failures."""
    counts = result["counts"]
    total = sum(counts.values()) + result["failed"]
    lines = []
    for name in sorted(set(BACKENDS) | set(counts)):
        n = counts.get(name, 0)
        lines.append(f"  {name:12} {n:3}  {'#' * n}")
    if result["failed"]:
        why = ", ".join(f"{k} x{v}" for k, v in result["errors"].items())
        lines.append(f"  {'failed':12} {result['failed']:3}  ({why})")
    lines.append(f"  {total} connections to {result['target']}/{result['protocol']}")
    return "\n".join(lines)


def probe(run, target: str, count: int = 30, udp: bool = False) -> dict:
    argv = PROBE + [target, "--count", str(count)] + (["--udp"] if udp else [])
    out = run(argv, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"target": target, "protocol": "UDP" if udp else "TCP", "counts": {}, "failed": count,
                "errors": {f"probe failed: {out.stderr.strip()[-200:]}": count}}


def run(lab: Lab, say, cli: list[str], common: list[str]) -> None:
    say("kube-proxy replacement: ciliumpy lab apply -f examples/services")
    lab.apply(EXAMPLES)
    print("Services web (ClusterIP 10.96.100.10, random) and web-nodeport (NodePort 30080, Maglev) "
          "over the pods web-1, web-2, web-3")

    say(f"30 TCP connections from pod web/client to the ClusterIP {CLUSTER_IP}:80")
    print(spread(probe(lambda argv, **kw: lab.exec("web/client", argv, **kw), f"{CLUSTER_IP}:80")))
    say(f"30 UDP requests from pod web/client to {CLUSTER_IP}:53")
    print(spread(probe(lambda argv, **kw: lab.exec("web/client", argv, **kw), f"{CLUSTER_IP}:53", udp=True)))
    node_ip = lab.node_ip()
    say(f"30 TCP connections from outside the node (ciliumpy lab exec --external) "
        f"to NodePort {node_ip}:{NODE_PORT}")
    print(spread(probe(lab.exec_external, f"{node_ip}:{NODE_PORT}")))

    say("ciliumpy service list")
    subprocess.run(cli + ["service", "list"] + common, check=False)
