"""`ciliumpy service list|get`, `status` and `bpf lb ...` through CliRunner: the service
commands against the agent's real API server over a fake agent (whose service manager is
real, writing to memory), the bpf commands against fake maps."""

from __future__ import annotations

import ipaddress
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cilium_py.agent.api import APIServer
from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.manager import ServiceManager
from cilium_py.agent.services.wiring import kpr_status
from cilium_py.agent.services.writer import MemoryWriter
from cilium_py.agent.objects import parse_object
from cilium_py.agent.store import Store
from cilium_py.cli import service as service_cli
from cilium_py.cli.main import cli
from cilium_py.datapath.maps.lb import (
    BE_STATE_TERMINATING,
    SVC_F_NODEPORT,
    SVC_F_TWO_SCOPES,
    Backend,
    BackendsMap,
    RevNatMap,
    ServiceEntry,
    ServicesMap,
    frontend,
)


class FakeAgent:
    """What the API server asks of an agent, with a real service manager."""

    def __init__(self):
        self.store = Store()
        self.config = type("C", (), {"cgroup_root": "/sys/fs/cgroup/unified/x", "bpf_lb_sock": True,
                                     "node_port_range": (30000, 32767),
                                     "datapath": type("D", (), {"lb_algorithm": "random",
                                                                "lb_acceleration": "disabled"})()})()
        self.services = ServiceManager(self.store, MemoryWriter(),
                                       ServiceConfig(node="n1", node_ips=("10.245.1.1",)), socket_lb=True)
        self.control = None

    def status(self):
        return {"node": "n1", "datapath": {"bpf_root": "/sys/fs/bpf/x", "events": "ringbuf",
                                           "events_received": 0, "events_lost": 0},
                "store": {"source": "manifests directory /m", "objects": 3, "errors": []},
                "controllers": {}, "endpoints": 0, "identities": 0,
                "policy": {"revision": 1, "realized": 1}, "map_pressure": {}, "hubble": {"enabled": False},
                "metrics": {}, "kube_proxy_replacement": kpr_status(self.config, self.services)}


@pytest.fixture
def agent(tmp_path):
    fake = FakeAgent()
    store = fake.store
    spec = {"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}]}
    store.upsert(parse_object({"apiVersion": "v1", "kind": "Service",
                               "metadata": {"name": "web", "namespace": "shop"}, "spec": spec}, "svc.yaml"))
    labels = {"kubernetes.io/service-name": "web"}
    store.upsert(parse_object({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": labels}, "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "n1"},
                      {"addresses": ["10.244.2.5"], "nodeName": "n2"},
                      {"addresses": ["10.244.1.6"], "conditions": {"terminating": True}, "nodeName": "n1"}]}, "eps.yaml"))
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad", "namespace": "shop"},
           "spec": {"ports": [{"port": 80, "protocol": "SCTP"}]}}
    store.upsert(parse_object(bad, "bad.yaml"))
    store.wait_idle(5)
    fake.services.sync()
    server = APIServer(str(tmp_path / "n1" / "ciliumpy.sock"), fake)
    server.start()
    yield tmp_path
    server.stop()
    fake.services.stop()
    store.close()


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    return result


def test_service_list_table(agent):
    result = run("service", "list", "--node", "n1", "--run-dir", str(agent))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "Frontend", "Service", "Type", "Backend"]
    assert lines[1].split()[:3] == ["1", "10.96.0.10:80/TCP", "ClusterIP"]
    assert "1 => 10.244.1.5:8080/TCP (active)" in lines[1]
    assert "2 => 10.244.1.6:8080/TCP (terminating)" in result.output
    # ETP=Local on the NodePort: external scope (local backends) and the internal one (/i).
    nodeport = [line for line in lines if "10.245.1.1:30080/TCP" in line]
    assert nodeport[0].split()[1:3] == ["10.245.1.1:30080/TCP", "NodePort,"]
    assert "ExtLocal" in nodeport[0] and "TwoScopes" in nodeport[0]
    assert any("10.245.1.1:30080/TCP/i" in line for line in lines)
    assert "Rejected:" in result.output
    assert "bad.yaml: Service shop/bad: spec.ports[0].protocol: SCTP is not supported" in result.output


def test_service_list_json_and_get(agent):
    result = run("service", "list", "--node", "n1", "--run-dir", str(agent), "-o", "json")
    views = json.loads(result.output)
    assert {(v["frontend"], v["type"]) for v in views} == {
        ("10.96.0.10:80/TCP", "ClusterIP"), ("10.245.1.1:30080/TCP", "NodePort"), ("0.0.0.0:30080/TCP", "NodePort")}
    nodeport = next(v for v in views if v["address"] == "10.245.1.1")
    assert [b["address"] for b in nodeport["backends"]] == ["10.244.1.5", "10.244.1.6"]
    assert [b["address"] for b in nodeport["internal_backends"]] == ["10.244.1.5", "10.244.1.6", "10.244.2.5"]
    result = run("service", "get", str(nodeport["id"]), "--node", "n1", "--run-dir", str(agent))
    assert result.exit_code == 0, result.output
    assert "Object:           Service shop/web port http" in result.output
    assert "Internal backends:" in result.output and "id=" in result.output
    result = run("service", "get", str(nodeport["id"]), "--node", "n1", "--run-dir", str(agent), "-o", "json")
    assert json.loads(result.output)["name"] == "web"
    missing = run("service", "get", "999", "--node", "n1", "--run-dir", str(agent))
    assert missing.exit_code == 1 and "service 999 not found" in missing.output


def test_status_shows_kube_proxy_replacement(agent):
    result = run("status", "--node", "n1", "--run-dir", str(agent))
    assert result.exit_code == 0, result.output
    assert ("KubeProxyReplacement: True   [Socket LB: Enabled, NodePort range 30000-32767, "
            "Backend Selection: Random, XDP Acceleration: disabled]") in result.output
    assert "Services:           1 services, 3 frontends, 3 backends, 1 rejected (in use: ClusterIP, NodePort)" \
        in result.output
    assert "rejected: bad.yaml: Service shop/bad: spec.ports[0].protocol" in result.output


def test_service_list_without_agent(tmp_path):
    result = run("service", "list", "--node", "nobody", "--run-dir", str(tmp_path))
    assert result.exit_code == 1 and "no agent answers" in result.output


# -- bpf lb (fake maps) ----------------------------------------------------------------------

class FakeMap:
    def __init__(self, rows):
        self.rows = rows

    def list(self):
        return self.rows

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def maps(monkeypatch):
    fe = frontend("10.96.0.10", 80, 6)
    np_fe = frontend("10.245.1.1", 30080, 6)
    np_fe_i = frontend("10.245.1.1", 30080, 6, 1)
    services = [ServiceEntry(fe, 1, [11, 12]),
                ServiceEntry(np_fe, 2, [11], flags=SVC_F_NODEPORT | SVC_F_TWO_SCOPES, algorithm=2),
                ServiceEntry(np_fe_i, 2, [11, 12], flags=SVC_F_NODEPORT | SVC_F_TWO_SCOPES)]
    backends = [Backend(11, ipaddress.IPv4Address("10.244.1.5"), 8080, 6, local=True),
                Backend(12, ipaddress.IPv4Address("10.244.2.5"), 8080, 6),
                Backend(13, ipaddress.IPv4Address("10.244.1.6"), 8080, 6, state=BE_STATE_TERMINATING)]
    revnat = [(1, ipaddress.IPv4Address("10.96.0.10"), 80), (2, ipaddress.IPv4Address("10.245.1.1"), 30080)]
    by_class = {ServicesMap: services, BackendsMap: backends, RevNatMap: revnat}
    monkeypatch.setattr(service_cli, "open_map", lambda cls, node, root: FakeMap(by_class[cls]))

    class FakeMaglev(FakeMap):
        def service_ids(self):
            return [2]

        def get_table(self, sid):
            return np.array([11, 11, 12, 11, 12, 11, 12], np.uint32) if sid == 2 else None

    monkeypatch.setattr(service_cli, "_maglev_map", lambda node, root: FakeMaglev([]))


def test_bpf_lb_list(maps):
    result = run("bpf", "lb", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["SERVICE", "ADDRESS", "BACKEND", "ADDRESS", "(REVNAT_ID)", "(SLOT)"]
    assert lines[1].split() == ["10.96.0.10:80/TCP", "(0)", "0.0.0.0:0", "(1)", "(0)", "[ClusterIP]"]
    assert lines[2].split() == ["10.96.0.10:80/TCP", "(1)", "10.244.1.5:8080/TCP", "(1)", "(1)"]
    assert any(line.startswith("10.245.1.1:30080/TCP/i (2)") for line in lines)
    rows = json.loads(run("bpf", "lb", "list", "-o", "json").output)
    assert rows[0]["flags"] == ["ClusterIP"] and rows[1]["backend_id"] == 11
    masters = json.loads(run("bpf", "lb", "list", "--frontends", "-o", "json").output)
    assert [r["algorithm"] for r in masters] == ["default", "maglev", "default"]


def test_bpf_lb_list_backends_and_revnat(maps):
    out = run("bpf", "lb", "list", "--backends").output.splitlines()
    assert out[0].split() == ["ID", "BACKEND", "ADDRESS", "STATE", "LOCAL"]
    assert out[1].split() == ["11", "10.244.1.5:8080/TCP", "active", "local"]
    assert out[3].split() == ["13", "10.244.1.6:8080/TCP", "terminating"]
    out = run("bpf", "lb", "list", "--revnat").output.splitlines()
    assert out[1].split() == ["1", "10.96.0.10:80"]


def test_bpf_lb_maglev(maps):
    out = run("bpf", "lb", "maglev", "list").output.splitlines()
    assert out[1].split() == ["2", "7", "11:4", "12:3"]
    result = run("bpf", "lb", "maglev", "get", "2")
    assert result.exit_code == 0 and "7 slots, 2 backends" in result.output
    assert result.output.splitlines()[1].split() == ["11", "4", "57.1%"]
    data = json.loads(run("bpf", "lb", "maglev", "get", "2", "--full", "-o", "json").output)
    assert data["distribution"] == {"11": 4, "12": 3} and data["table"] == [11, 11, 12, 11, 12, 11, 12]
    assert run("bpf", "lb", "maglev", "get", "2", "--full").output.splitlines()[0] == "[2]/v4"
    missing = run("bpf", "lb", "maglev", "get", "3")
    assert missing.exit_code == 1 and "service 3 has no Maglev table" in missing.output


def test_bpf_lb_without_pins(tmp_path):
    result = run("bpf", "lb", "list", "--bpf-root", str(tmp_path), "--node", "n1")
    assert result.exit_code == 1 and "is not pinned" in result.output


def test_agent_lb_flags(monkeypatch):
    from cilium_py.cli import agent as agent_cli

    seen = {}

    class Fake:
        def __init__(self, config):
            seen["config"] = config

        def run_forever(self):
            pass

    monkeypatch.setattr(agent_cli, "Agent", Fake)
    result = run("agent", "--node-netns", "x", "--bpf-lb-algorithm", "maglev", "--bpf-lb-maglev-table-size",
                 "1021", "--bpf-lb-maglev-hash-seed", "AAAAAAAAAAAAAAAA", "--node-port-range", "20000-21000",
                 "--bpf-lb-map-max", "4096")
    assert result.exit_code == 0, result.output
    cfg = seen["config"]
    assert (cfg.datapath.lb_algorithm, cfg.datapath.maglev_table_size, cfg.datapath.lb_map_max) == ("maglev", 1021, 4096)
    assert (cfg.node_port_range, cfg.maglev_hash_seed) == ((20000, 21000), "AAAAAAAAAAAAAAAA")
    for flag, value, words in (("--bpf-lb-maglev-table-size", "1000", "not one of the supported primes"),
                               ("--bpf-lb-maglev-hash-seed", "short", "not valid base64"),
                               ("--node-port-range", "30000", "must look like 30000-32767"),
                               ("--bpf-lb-algorithm", "roundrobin", "roundrobin")):
        bad = run("agent", "--node-netns", "x", flag, value)
        assert bad.exit_code == 2 and flag in bad.output and words in bad.output, bad.output
