"""Hubble as a user meets it: real TCP, UDP and ICMP in the lab, then `hubble observe`
(the installed console script) against the lab agent's Observer socket, and the agent's
Prometheus endpoints scraped over HTTP."""

from __future__ import annotations

import datetime
import json
import os
import re
import select
import subprocess
import sys
import time
import urllib.request

import pytest

from cilium_py.lab.matrix import Target, probe

from .manifests import cnp, np

pytestmark = pytest.mark.e2e

HUBBLE = os.path.join(os.path.dirname(sys.executable), "hubble")


# x accepts TCP 80 and UDP 81 from namespace y only; z is denied x/a explicitly.
POLICIES = [
    np("from-y", "x", {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{
        "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
        "ports": [{"protocol": "TCP", "port": 80}, {"protocol": "UDP", "port": 81}]}]}),
    cnp("deny-z", "x", {"endpointSelector": {"matchLabels": {"pod": "a"}}, "ingressDeny": [{
        "fromEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "z"}}]}]}),
]


def hubble(server: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([HUBBLE, "observe", "--server", server, *args], capture_output=True,
                         text=True, timeout=30)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def flows(server: str, since: str, *args: str) -> list[dict]:
    out = hubble(server, "-o", "json", "--since", since, *args)
    return [json.loads(line)["flow"] for line in out.stdout.splitlines() if '"flow"' in line]


def pod(ep: dict) -> str:
    return f"{ep.get('namespace', '')}/{ep.get('podName', '')}"


def find(flows_: list[dict], **want) -> list[dict]:
    def ok(f):
        for key, value in want.items():
            if key == "src" and pod(f.get("source", {})) != value:
                return False
            if key == "dst" and pod(f.get("destination", {})) != value:
                return False
            if key == "kind" and f.get("eventType", {}).get("type") != value:
                return False
            if key == "proto" and value not in f.get("l4", {}):
                return False
            if key not in ("src", "dst", "kind", "proto") and f.get(key) != value:
                return False
        return True
    return [f for f in flows_ if ok(f)]


@pytest.fixture(scope="module")
def traffic(e2e):
    """Applies the policies, makes allowed and denied connections of each protocol once,
    and yields (lab, since): everything after `since` in the ring is this module's."""
    since = datetime.datetime.now(datetime.timezone.utc).isoformat()
    path = e2e.apply(POLICIES)
    try:
        ip = e2e.ips
        src = e2e.sources
        results = {
            "y/a->x/a tcp": probe(src["y/a"], Target("x/a", ip["x/a"], 80, "TCP")),
            "y/a->x/a udp": probe(src["y/a"], Target("x/a", ip["x/a"], 81, "UDP")),
            "z/b->x/a tcp": probe(src["z/b"], Target("x/a", ip["x/a"], 80, "TCP")),
            "z/b->x/b tcp": probe(src["z/b"], Target("x/b", ip["x/b"], 80, "TCP")),
        }
        results["y/a->x/b icmp"] = e2e.lab.exec("y/a", ["ping", "-c1", "-W1", ip["x/b"]],
                                                capture_output=True).returncode == 0
        results["y/a->z/a icmp"] = e2e.lab.exec("y/a", ["ping", "-c1", "-W1", ip["z/a"]],
                                                capture_output=True).returncode == 0
        assert results == {"y/a->x/a tcp": True, "y/a->x/a udp": True, "z/b->x/a tcp": False,
                           "z/b->x/b tcp": False, "y/a->x/b icmp": False, "y/a->z/a icmp": True}
        yield e2e, since
    finally:
        e2e.lab.delete(path)


def test_observe_shows_allowed_and_denied_flows_with_reasons_and_policies(traffic):
    lab, since = traffic
    got = flows(lab.lab.hubble_server, since, "--all")

    allowed = find(got, src="y/a", dst="x/a", kind=5, proto="TCP")
    assert allowed and allowed[0]["verdict"] == "FORWARDED"
    assert allowed[0]["trafficDirection"] == "INGRESS"
    assert [(p["name"], p["namespace"], p["kind"]) for p in allowed[0]["ingressAllowedBy"]] == [
        ("from-y", "x", "NetworkPolicy")]
    assert allowed[0]["l4"]["TCP"]["destinationPort"] == 80
    assert allowed[0]["source"]["labels"] and allowed[0]["destination"]["identity"] > 255
    traces = find(got, src="y/a", dst="x/a", kind=4, proto="TCP")
    assert {t.get("traceObservationPoint") for t in traces} >= {"FROM_ENDPOINT", "TO_ENDPOINT"}
    assert any(t.get("isReply") is True for t in find(got, src="x/a", dst="y/a", kind=4))

    assert find(got, src="y/a", dst="x/a", kind=4, proto="UDP", verdict="FORWARDED")

    explicit = find(got, src="z/b", dst="x/a", kind=1, proto="TCP")
    assert explicit and explicit[0]["verdict"] == "DROPPED"
    assert explicit[0]["dropReasonDesc"] == "POLICY_DENY"
    assert explicit[0]["trafficDirection"] == "INGRESS"
    assert [p["name"] for p in explicit[0]["ingressDeniedBy"]] == ["deny-z"]

    default = find(got, src="z/b", dst="x/b", kind=1, proto="TCP")
    assert default and default[0]["dropReasonDesc"] == "POLICY_DENIED"
    assert "ingressDeniedBy" not in default[0]

    icmp_drop = find(got, src="y/a", dst="x/b", kind=1, proto="ICMPv4")
    assert icmp_drop and icmp_drop[0]["dropReasonDesc"] == "POLICY_DENIED"
    assert icmp_drop[0]["l4"]["ICMPv4"]["type"] == 8
    assert find(got, src="y/a", dst="z/a", kind=4, proto="ICMPv4", verdict="FORWARDED")
    assert all(f["nodeName"] == lab.lab.name for f in got)


def test_filters_and_not_narrow_the_result(traffic):
    lab, since = traffic
    server = lab.lab.hubble_server
    drops = flows(server, since, "--all", "--from-pod", "z/b", "--verdict", "DROPPED")
    assert drops and all(pod(f["source"]) == "z/b" and f["verdict"] == "DROPPED" for f in drops)
    assert {pod(f["destination"]) for f in drops} == {"x/a", "x/b"}

    not_dropped = flows(server, since, "--all", "--namespace", "x", "--not", "--verdict", "DROPPED")
    assert not_dropped and all(f["verdict"] != "DROPPED" for f in not_dropped)
    assert all("x" in (f["source"].get("namespace"), f["destination"].get("namespace"))
               for f in not_dropped)

    udp = flows(server, since, "--all", "--protocol", "udp", "--to-port", "81")
    assert udp and all("UDP" in f["l4"] and f["l4"]["UDP"]["destinationPort"] == 81 for f in udp)

    deny = flows(server, since, "--all", "--type", "drop", "--drop-reason-desc", "POLICY_DENY")
    assert deny and {(pod(f["source"]), pod(f["destination"])) for f in deny} == {("z/b", "x/a")}

    ident = lab.lab.client().endpoints()
    z_b = next(ep for ep in ident if ep["pod"] == "z/b")["identity"]
    by_identity = flows(server, since, "--all", "--from-identity", str(z_b))
    assert by_identity and all(f["source"]["identity"] == z_b for f in by_identity)

    last_two = hubble(server, "--since", since, "--last", "2", "-o", "json").stdout.splitlines()
    assert len(last_two) == 2

    compact = hubble(server, "--since", since, "--all", "--from-pod", "z/b", "--to-pod", "x/a",
                     "--type", "drop", "--print-policy-names").stdout
    assert re.search(r"z/b:\d+ \(ID:\d+\) <> x/a:80 \(ID:\d+\) .*DROPPED \(TCP Flags: SYN\)", compact)
    assert "deny-z" in compact


def _follower(server: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([HUBBLE, "observe", "--server", server, "--follow", "-o", "json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _next_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no flow within {timeout}s; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
    return proc.stdout.readline()


def test_followers_see_new_flows_within_a_second(e2e):
    server = e2e.lab.hubble_server
    target = Target("x/c", e2e.ips["x/c"], 80, "TCP")
    # A flow of y/c first, so a follower proves it is connected by printing it.
    assert probe(e2e.sources["y/c"], target)
    followers = [_follower(server, "--last", "1", "--from-pod", "y/c") for _ in range(2)]
    # A slow reader: follows everything and is never read; it must hold up nobody.
    slow = _follower(server, "--last", "100")
    try:
        for f in followers:
            json.loads(_next_line(f, 10))
        assert probe(e2e.sources["y/c"], target)
        started = time.monotonic()
        for f in followers:
            flow = json.loads(_next_line(f, 1.0))["flow"]
            assert pod(flow["source"]) == "y/c" and pod(flow["destination"]) == "x/c"
        assert time.monotonic() - started < 1.0
        assert slow.poll() is None
    finally:
        for proc in (*followers, slow):
            proc.terminate()
            proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
    # Clients gone mid-stream: the server still answers.
    status = subprocess.run([HUBBLE, "status", "--server", server], capture_output=True, text=True,
                            timeout=30)
    assert status.returncode == 0 and "Ok" in status.stdout


def _scrape(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_count_the_traffic(e2e):
    addresses = e2e.lab.status()["metrics"]
    drop_key = 'ciliumpy_drop_count_total{direction="INGRESS",reason="POLICY_DENY"}'
    hubble_key = 'hubble_drop_total{protocol="TCP",reason="POLICY_DENY"}'
    verdict_key = 'ciliumpy_policy_verdict_total{action="deny",direction="ingress",match="l3-only"}'
    before_agent, before_hubble = _scrape(addresses["agent"]), _scrape(addresses["hubble"])
    path = e2e.apply([POLICIES[1]])
    try:
        for _ in range(3):
            assert not probe(e2e.sources["z/c"], Target("x/a", e2e.ips["x/a"], 80, "TCP"), timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            agent, flows_ = _scrape(addresses["agent"]), _scrape(addresses["hubble"])
            drops = agent.get(drop_key, 0) - before_agent.get(drop_key, 0)
            hubble_drops = flows_.get(hubble_key, 0) - before_hubble.get(hubble_key, 0)
            if hubble_drops >= drops >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        # Each probe's SYN is dropped once and retransmitted only after the probe gave up.
        assert drops >= 3 and hubble_drops == drops
        assert agent.get(verdict_key, 0) - before_agent.get(verdict_key, 0) == drops
        assert agent["ciliumpy_endpoint_count"] == 9
        assert 'ciliumpy_bpf_map_pressure{map_name="ciliumpy_ct4_global"}' in agent
        assert agent['ciliumpy_events_lost_total{source="datapath"}'] == 0
    finally:
        e2e.lab.delete(path)


@pytest.mark.parametrize("args,message", [
    (["--verdict", "NOPE"], "--verdict"),
    (["--from-ip", "10.0.0.300"], "--from-ip"),
    (["--to-port", "70000"], "--to-port"),
    (["--no-such-flag"], "No such option"),
    (["--allowlist", '{"source_ip": ["bad"]}'], "invalid filter"),
])
def test_bad_input_is_a_clear_error(e2e, args, message):
    out = hubble(e2e.lab.hubble_server, *args, check=False)
    assert out.returncode != 0
    assert message in out.stderr
