"""The kube-proxy replacement in the session lab, as a user drives it: examples/services
applied (a ClusterIP and a NodePort Service over three pods), `ciliumpy service list` and
`ciliumpy bpf lb list`, real connections from a pod (ClusterIP, TCP and UDP) and from
outside the node (NodePort) spreading over the three backends, a pod going away, an
EndpointSlice given by hand, and bad input reported while the rest keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cilium_py.lab.lbprobe import probe

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "services"
CLUSTER_IP = "10.96.100.10"
NODE_PORT = 30080
WEB = {"web/web-1", "web/web-2", "web/web-3"}
CLI = [sys.executable, "-m", "cilium_py.cli.main"]
PROBE = [sys.executable, "-m", "cilium_py.lab.lbprobe"]
COUNT = 30


def cli(lab, *args) -> subprocess.CompletedProcess:
    common = ["--node", lab.name, "--run-dir", str(lab.paths.run)]
    out = subprocess.run(CLI + list(args) + common, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    return out


def bpf(lab, *args) -> list[dict]:
    out = subprocess.run(CLI + list(args) + ["--node", lab.name, "--bpf-root", lab.bpf_root, "-o", "json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def from_pod(lab, pod: str, target: str, udp: bool = False) -> dict:
    """Connections made by a process in the pod (its netns and the lab's cgroup, so the
    socket hooks apply), as `ciliumpy lab exec` runs them."""
    out = lab.exec(pod, PROBE + [target, "--count", str(COUNT)] + (["--udp"] if udp else []),
                   capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def from_outside(lab, target: str) -> dict:
    """Through the CLI: `ciliumpy lab exec --external -- python -m cilium_py.lab.lbprobe ...`."""
    out = subprocess.run(CLI + ["lab", "exec", "--name", lab.name, "--external", "--"] + PROBE
                         + [target, "--count", str(COUNT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def assert_spread(result: dict, backends: set[str]) -> None:
    """Every connection answered, by the expected backends only, each of them used (30
    connections over three backends miss one with probability about 1e-5)."""
    assert result["failed"] == 0, result
    assert set(result["counts"]) == backends, result
    assert sum(result["counts"].values()) == COUNT


@pytest.fixture
def web(cluster):
    """The session lab with examples/services applied (the cluster fixture removes them)."""
    cluster.lab.apply(EXAMPLES)
    return cluster


def test_services_listed_and_programmed(web):
    lab = web.lab
    views = json.loads(cli(lab, "service", "list", "-o", "json").stdout)
    by_frontend = {v["frontend"]: v for v in views}
    node_ip = lab.node_ip()
    assert {f"{CLUSTER_IP}:80/TCP", f"{CLUSTER_IP}:53/UDP", "10.96.100.11:80/TCP",
            f"{node_ip}:{NODE_PORT}/TCP", f"0.0.0.0:{NODE_PORT}/TCP"} <= set(by_frontend)
    eps = {ep["pod"]: ep["ipv4"] for ep in lab.client().endpoints()}
    web_ips = sorted(eps[p] for p in WEB)
    for frontend, port in ((f"{CLUSTER_IP}:80/TCP", 8080), (f"{CLUSTER_IP}:53/UDP", 8081),
                           (f"{node_ip}:{NODE_PORT}/TCP", 8080)):
        v = by_frontend[frontend]
        assert sorted(b["address"] for b in v["backends"]) == web_ips, v
        assert {(b["port"], b["state"], b["local"]) for b in v["backends"]} == {(port, "active", True)}
    assert by_frontend[f"{node_ip}:{NODE_PORT}/TCP"]["algorithm"] == "maglev"
    table = cli(lab, "service", "list").stdout
    assert table.splitlines()[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
    assert f"{node_ip}:{NODE_PORT}/TCP" in table and "(active)" in table

    # The pinned maps say the same (read by `ciliumpy bpf lb list`, no agent involved).
    rows = bpf(lab, "bpf", "lb", "list")
    slots = {}
    for r in rows:
        if r["slot"]:
            slots.setdefault(r["frontend"], set()).add(r["backend_address"].split(":")[0])
    assert slots[f"{CLUSTER_IP}:80/TCP"] == set(web_ips)
    assert slots[f"{node_ip}:{NODE_PORT}/TCP"] == set(web_ips)
    nodeport_id = by_frontend[f"{node_ip}:{NODE_PORT}/TCP"]["id"]
    maglev = {r["service_id"]: r for r in bpf(lab, "bpf", "lb", "maglev", "list")}
    assert len(maglev[nodeport_id]["distribution"]) == 3
    status = cli(lab, "status").stdout
    assert "KubeProxyReplacement: True" in status and "Socket LB: Enabled" in status


def test_cluster_ip_from_a_pod_spreads_over_the_backends(web):
    assert_spread(from_pod(web.lab, "web/client", f"{CLUSTER_IP}:80"), WEB)
    assert_spread(from_pod(web.lab, "web/client", f"{CLUSTER_IP}:53", udp=True), WEB)
    # Another namespace's pod reaches the same Service.
    assert_spread(from_pod(web.lab, "y/a", f"{CLUSTER_IP}:80"), WEB)


def test_node_port_from_outside_spreads_over_the_backends(web):
    assert_spread(from_outside(web.lab, f"{web.lab.node_ip()}:{NODE_PORT}"), WEB)


def test_a_pod_going_away_leaves_the_service(web):
    gone = web.write([doc for doc in yaml.safe_load_all((EXAMPLES / "00-web.yaml").read_text())
                      if doc["kind"] == "Pod" and doc["metadata"]["name"] == "web-2"], name="web-2.yaml")
    web.lab.delete(gone)
    views = json.loads(cli(web.lab, "service", "list", "-o", "json").stdout)
    cluster_ip = next(v for v in views if v["frontend"] == f"{CLUSTER_IP}:80/TCP")
    assert len(cluster_ip["backends"]) == 2
    remaining = WEB - {"web/web-2"}
    assert_spread(from_pod(web.lab, "web/client", f"{CLUSTER_IP}:80"), remaining)
    assert_spread(from_outside(web.lab, f"{web.lab.node_ip()}:{NODE_PORT}"), remaining)


def test_endpoint_slice_given_by_hand(cluster):
    """A Service without selector and its EndpointSlice, applied before the Service: the
    slice is reported as waiting, then used."""
    backends = {"x/a", "x/b"}
    eps = [{"addresses": [cluster.ips[p]], "conditions": {"ready": True}} for p in sorted(backends)]
    cluster.apply([{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "manual-1", "namespace": "x",
                                 "labels": {"kubernetes.io/service-name": "manual"}},
                    "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                    "endpoints": eps}])
    waiting = cluster.lab.client().get("/v1/services")["warnings"]
    assert any(w["object"] == "EndpointSlice x/manual-1" and "does not exist (yet)" in w["message"] for w in waiting)
    cluster.apply([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual", "namespace": "x"},
                    "spec": {"clusterIP": "10.96.100.20", "ports": [{"name": "http", "port": 8000, "targetPort": 80}]}}])
    assert_spread(from_pod(cluster.lab, "z/c", "10.96.100.20:8000"), backends)


def test_bad_services_are_reported_and_the_rest_keeps_working(web):
    web.apply([
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sctp", "namespace": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"port": 9000, "protocol": "SCTP"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "thief", "namespace": "web"},
         "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 81, "nodePort": NODE_PORT}]}},
    ])
    data = web.lab.client().get("/v1/services")
    rejected = {(r["object"], r["field"]): r["message"] for r in data["rejected"]}
    assert "SCTP is not supported" in rejected[("Service web/sctp", "spec.ports[0].protocol")]
    assert "nodePort 30080/TCP is already used by Service web/web-nodeport" in \
        rejected[("Service web/thief", "spec.ports[0].nodePort")]
    assert "Service web/thief" in cli(web.lab, "service", "list").stdout  # in the Rejected section
    assert "rejected: " in cli(web.lab, "status").stdout
    assert_spread(from_outside(web.lab, f"{web.lab.node_ip()}:{NODE_PORT}"), WEB)
    assert_spread(from_pod(web.lab, "web/client", f"{CLUSTER_IP}:80"), WEB)


def test_lbprobe_counts_failures():
    # Nothing listens on this loopback port in the test's own namespace.
    result = probe("127.0.0.1:9", 2, timeout=0.2)
    assert result["failed"] == 2 and result["counts"] == {}
