"""Real TCP, UDP and ICMP between pod namespaces through the attached programs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cilium_py.agent.policy.mapstate import PolicyRule
from cilium_py.datapath import netns
from cilium_py.datapath.maps.conntrack import ConntrackTables
from cilium_py.datapath.maps.endpoints import EndpointMap
from cilium_py.datapath.maps.metrics import MetricsMap
from cilium_py.datapath.reasons import DIR_INGRESS, POLICY_DENY

from .conftest import IDENTITIES

pytestmark = pytest.mark.netns

TCP, UDP, ICMP = 6, 17, 1
A, B, C = IDENTITIES["a"], IDENTITIES["b"], IDENTITIES["c"]


def ciliumpy(lab, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cilium_py.cli.main", *args, "--node",
                           lab.config.node, "--bpf-root", lab.config.bpf_root],
                          capture_output=True, text=True, timeout=60)


def test_without_policy_everything_flows(clean_lab):
    assert clean_lab.tcp_ok("a", "b", 80)
    assert clean_lab.udp_ok("c", "b")
    assert clean_lab.ping_ok("a", clean_lab.ip("c"))


def test_ingress_allowed_by_identity_and_port(clean_lab):
    clean_lab.set_policy("b", [PolicyRule(A, "ingress", TCP, 80)], ingress=True, egress=False)
    assert clean_lab.tcp_ok("a", "b", 80)
    assert not clean_lab.tcp_ok("c", "b", 80), "identity c has no allow entry"
    assert not clean_lab.tcp_ok("a", "b", 8080), "port 8080 is not allowed"


def test_udp_and_icmp_rules(clean_lab):
    clean_lab.set_policy("b", [PolicyRule(A, "ingress", UDP, 53), PolicyRule(A, "ingress", ICMP, 8)],
                         ingress=True, egress=False)
    assert clean_lab.udp_ok("a", "b")
    assert not clean_lab.udp_ok("c", "b")
    assert clean_lab.ping_ok("a", clean_lab.ip("b")), "echo request (type 8) is allowed"
    assert not clean_lab.ping_ok("c", clean_lab.ip("b"))


def test_port_range(clean_lab):
    clean_lab.set_policy("b", [PolicyRule(0, "ingress", TCP, 8080, 8090)], ingress=True, egress=False)
    assert clean_lab.tcp_ok("c", "b", 8080)
    assert clean_lab.tcp_ok("c", "b", 8085)
    assert clean_lab.tcp_ok("c", "b", 8090)
    assert not clean_lab.tcp_ok("c", "b", 8091)
    assert not clean_lab.tcp_ok("c", "b", 80)


def test_deny_beats_allow(clean_lab):
    clean_lab.set_policy("b", [PolicyRule(0, "ingress"), PolicyRule(C, "ingress", deny=True)],
                         ingress=True, egress=False)
    assert clean_lab.tcp_ok("a", "b", 80)
    assert not clean_lab.tcp_ok("c", "b", 80)
    metrics = MetricsMap(clean_lab.config.pin_dir)
    assert metrics.get(POLICY_DENY, DIR_INGRESS).packets > 0


def test_replies_pass_default_deny_ingress(clean_lab):
    # a accepts nothing new, but its own connections' replies come back.
    clean_lab.set_policy("a", [], ingress=True, egress=False)
    assert clean_lab.tcp_ok("a", "b", 80)
    assert clean_lab.udp_ok("a", "b")
    assert clean_lab.ping_ok("a", clean_lab.ip("b"))
    assert not clean_lab.tcp_ok("b", "a", 80)
    assert not clean_lab.ping_ok("b", clean_lab.ip("a"))


def test_egress_policy(clean_lab):
    clean_lab.set_policy("a", [PolicyRule(B, "egress", TCP, 80)], ingress=False, egress=True)
    assert clean_lab.tcp_ok("a", "b", 80)
    assert not clean_lab.tcp_ok("a", "c", 80)
    assert not clean_lab.tcp_ok("a", "b", 8080)


def test_established_connection_survives_agent_restart(clean_lab):
    clean_lab.set_policy("b", [PolicyRule(A, "ingress", TCP, 80)], ingress=True, egress=False)
    sock = clean_lab.tcp_connect("a", clean_lab.ip("b"), 80)
    with sock:
        assert sock.recv(64) == b"b\n"
        clean_lab.agent.stop()
        try:
            sock.sendall(b"while-down")
            assert sock.recv(64) == b"while-down"
            assert not clean_lab.tcp_ok("c", "b", 80), "enforcement continues without an agent"
        finally:
            clean_lab.agent.start()
        sock.sendall(b"after-restart")
        assert sock.recv(64) == b"after-restart"
    assert not clean_lab.tcp_ok("c", "b", 80), "the new agent's programs enforce the same policy"
    assert clean_lab.tcp_ok("a", "b", 80)


def test_conntrack_visible_through_cli(clean_lab):
    sock = clean_lab.tcp_connect("a", clean_lab.ip("b"), 80)
    with sock:
        assert sock.recv(64) == b"b\n"
        result = ciliumpy(clean_lab, "bpf", "ct", "list", "global", "-o", "json")
        assert result.returncode == 0, result.stderr
        entries = json.loads(result.stdout)
        port = sock.getsockname()[1]
        mine = [e for e in entries if e["source"] == f"{clean_lab.ip('a')}:{port}"]
        assert {e["direction"] for e in mine} == {"OUT", "IN"}
        assert all(e["protocol"] == "TCP" and e["destination"] == f"{clean_lab.ip('b')}:80" for e in mine)
        assert all(e["tx_packets"] >= 1 and e["rx_packets"] >= 1 for e in mine)
        assert all(e["expires_in"] > 60 for e in mine), "established TCP has the long lifetime"
    text = ciliumpy(clean_lab, "bpf", "ct", "list", "global")
    assert f"TCP OUT {clean_lab.ip('a')}:{port} -> {clean_lab.ip('b')}:80" in text.stdout
    flushed = ciliumpy(clean_lab, "bpf", "ct", "flush", "global")
    assert flushed.returncode == 0
    tables = ConntrackTables(clean_lab.config.pin_dir)
    assert tables.connections() == []
    tables.close()


def test_monitor_shows_drops_and_verdicts(clean_lab):
    clean_lab.set_policy("b", [PolicyRule(A, "ingress", TCP, 80)], ingress=True, egress=False)
    monitor = subprocess.Popen(
        [sys.executable, "-m", "cilium_py.cli.main", "monitor", "--node", clean_lab.config.node,
         "--run-dir", clean_lab.run_dir, "-j"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Listening" in monitor.stderr.readline()
        assert not clean_lab.tcp_ok("c", "b", 80)
        assert clean_lab.tcp_ok("a", "b", 80)
        seen = []
        while not ({"drop", "policy-verdict", "trace"} <= {e["type"] for e in seen}
                   and any(e["type"] == "policy-verdict" and e["verdict"] == 0 for e in seen)):
            seen.append(json.loads(monitor.stdout.readline()))
        drop = next(e for e in seen if e["type"] == "drop")
        assert drop["drop_reason"] == 133 and drop["drop_reason_name"] == "POLICY_DENIED"
        assert drop["src_identity"] == C and drop["packet"]["dst_port"] == 80
        allow = next(e for e in seen if e["type"] == "policy-verdict" and e["verdict"] == 0)
        assert allow["match_type"] == "L3-L4" and allow["src_identity"] == A
    finally:
        monitor.terminate()
        monitor.wait(5)


def test_prefilter_drops_at_the_node_device(clean_lab):
    world = clean_lab.node.ext_netns
    target = clean_lab.ip("a")

    def ping_from_world():
        return netns.run(world, ["ping", "-c", "1", "-W", "1", target], capture_output=True).returncode == 0

    assert ping_from_world()
    source = f"{clean_lab.node.addressing.world_ip}/32"
    assert ciliumpy(clean_lab, "bpf", "prefilter", "update", source).returncode == 0
    try:
        listed = json.loads(ciliumpy(clean_lab, "bpf", "prefilter", "list", "-o", "json").stdout)
        assert {"prefix": source} in listed
        before = MetricsMap(clean_lab.config.pin_dir).get(POLICY_DENY, DIR_INGRESS).packets
        assert not ping_from_world()
        assert MetricsMap(clean_lab.config.pin_dir).get(POLICY_DENY, DIR_INGRESS).packets > before
    finally:
        assert ciliumpy(clean_lab, "bpf", "prefilter", "delete", source).returncode == 0
    assert ping_from_world()


def test_endpoint_teardown_leaves_nothing(lab):
    handle = lab.manager.create("tmp", lab.node.addressing.pod_ip(50), 1050)
    assert netns.exists(handle.netns)
    lab.manager.delete("tmp")
    assert not netns.exists(handle.netns)
    assert EndpointMap(lab.config.pin_dir).get(handle.ip) is None
    from pyroute2 import IPRoute

    with netns.entered(lab.node.netns), IPRoute() as ipr:
        assert ipr.link_lookup(ifname=handle.host_ifname) == []
    result = ciliumpy(lab, "bpf", "endpoint", "list", "-o", "json")
    assert str(handle.ip) not in result.stdout
