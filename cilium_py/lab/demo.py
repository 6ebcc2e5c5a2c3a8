"""`make demo`: the lab with the policies the docs teach, and what they do to real traffic.

`ciliumpy lab up -f examples/demo` builds a node with pods in three namespaces and these
policies: default deny in `shop`, DNS allowed, frontend -> backend on one port, a
CiliumNetworkPolicy whose ingressDeny beats its allow, same-namespace traffic in `other`,
and a clusterwide egress deny with an except CIDR. Then every pod tries every port (and
the world outside the node), the matrix shows what got through, and `hubble observe`
shows the denied connections with their drop reasons and policies; then the Services of
examples/services: a ClusterIP and a NodePort, connected 30 times each, and how the
connections spread over their three backends. The lab is removed at
the end, also on failure or Ctrl-C. (`python -m cilium_py.lab.datapath_demo` is the
datapath-only demo without the control plane.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cilium_py.agent.objects import Pod
from cilium_py.agent.sources.manifests import parse_documents
from cilium_py.lab import services_demo
from cilium_py.lab.lab import WORLD_PORT, Lab
from cilium_py.lab.matrix import Target, measure, render
from cilium_py.vocab import protocol_name

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "demo"
NAME = "demo"


def say(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def pod_targets(directory: Path) -> list[tuple[str, int, str]]:
    """(namespace/pod, port, protocol) for every containerPort in the manifests, read by the
    same parser the agent uses."""
    out = []
    for f in sorted(directory.glob("*.yaml")):
        objects, _ = parse_documents(f.read_text(), str(f))
        out += [(f"{pod.namespace}/{pod.name}", p.port, protocol_name(p.protocol))
                for pod in objects if isinstance(pod, Pod) for p in pod.ports]
    return out


def main() -> None:
    lab = Lab(NAME)
    lab.down()  # leftovers of an interrupted demo
    try:
        say(f"ciliumpy lab up -f {EXAMPLES.relative_to(Path.cwd()) if EXAMPLES.is_relative_to(Path.cwd()) else EXAMPLES}")
        started = time.monotonic()
        result = lab.up(EXAMPLES)
        print(f"{result['endpoints']} pods enforcing policy revision {result['revision']} "
              f"after {time.monotonic() - started:.1f}s")
        endpoints = {ep["pod"]: ep for ep in lab.client().endpoints()}
        sources = {pod: ep["netns"] for pod, ep in sorted(endpoints.items())}
        targets = [Target(pod, endpoints[pod]["ipv4"], port, proto)
                   for pod, port, proto in pod_targets(EXAMPLES) if pod in endpoints]
        targets.append(Target("world", lab.world_ip(), WORLD_PORT))

        say("reachability (rows: from, columns: to; ok = connected, -- = denied)")
        matrix = measure(sources, targets)
        print(render(matrix, list(sources), targets))

        say("hubble observe --type drop --print-policy-names   (the denied connections above)")
        # Every denied probe of the matrix, with its drop reason and the policy that denied
        # it (a default deny has no policy to name: nothing allowed the connection).
        observe = [sys.executable, "-m", "cilium_py.cli.hubble", "observe", "--server",
                   lab.hubble_server, "--print-policy-names"]
        subprocess.run(observe + ["--type", "drop", "--last", "12"], check=False)
        say("hubble observe --type policy-verdict --verdict FORWARDED --last 5 --print-policy-names")
        subprocess.run(observe + ["--type", "policy-verdict", "--verdict", "FORWARDED", "--last", "5"],
                       check=False)

        cli = [sys.executable, "-m", "cilium_py.cli.main"]
        common = ["--node", NAME, "--run-dir", str(lab.paths.run)]
        services_demo.run(lab, say, cli, common)

        say("ciliumpy endpoint list")
        subprocess.run(cli + ["endpoint", "list"] + common, check=False)
        say("ciliumpy policy get")
        subprocess.run(cli + ["policy", "get"] + common, check=False)
    finally:
        say(f"ciliumpy lab down --name {NAME}")
        removed = lab.down()
        print(f"removed {len(removed)} things the lab created")


if __name__ == "__main__":
    main()
