"""Bad input is reported with its object and field while earlier policy stays enforced;
a restarted lab agent keeps identities, endpoints and enforcement."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .test_policy_matrix import np, ns_of

pytestmark = pytest.mark.e2e

BAD = {
    "port out of range": (np("bad-port", "x", {"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}),
                          "port"),
    "endPort below port": (np("bad-range", "x", {"podSelector": {}, "ingress": [
        {"ports": [{"port": 90, "endPort": 80}]}]}), "endPort"),
    "invalid CIDR": (np("bad-cidr", "x", {"podSelector": {}, "ingress": [
        {"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}), "cidr"),
    "invalid selector": (np("bad-selector", "x", {"podSelector": {"matchExpressions": [
        {"key": "pod", "operator": "Sometimes", "values": ["a"]}]}}), "operator"),
    "L7 rule": ({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                 "metadata": {"name": "l7", "namespace": "x"},
                 "spec": {"endpointSelector": {}, "ingress": [{"toPorts": [
                     {"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": [{"method": "GET"}]}}]}]}},
                "L7"),
}


def test_bad_input_is_rejected_and_the_rest_keeps_working(cluster):
    cluster.apply([np("deny", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    cluster.expect(lambda s, d: ns_of(d) != "x")
    for doc, _ in BAD.values():
        cluster.apply([doc])
    (cluster.lab.paths.manifests / "unknown.yaml").write_text(
        "apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n")
    cluster.lab.wait_realized()
    rejected = cluster.lab.client().policy()["rejected"]
    text = json.dumps(rejected)
    for case, (doc, field_word) in BAD.items():
        mine = [r for r in rejected if doc["metadata"]["name"] in r["object"]]
        assert mine, f"{case}: not reported; rejected = {text}"
        assert field_word.lower() in (mine[0]["field"] + mine[0]["message"]).lower(), f"{case}: {mine[0]}"
    assert any("Gadget" in r["message"] or "Gadget" in r["object"] for r in rejected), text
    # The valid policy applied before is still enforced, and the agent still answers.
    cluster.expect(lambda s, d: ns_of(d) != "x")
    assert cluster.lab.status()["agent_running"]


def test_lab_apply_refuses_a_file_that_is_not_yaml(cluster):
    from cilium_py.lab.lab import LabError

    broken = cluster.write([], name="not-yaml.yaml")
    broken.write_text("kind: NetworkPolicy\nmetadata: {name: [unclosed\n")
    with pytest.raises(LabError, match="not valid YAML"):
        cluster.lab.apply(broken)


def test_restart_keeps_identities_endpoints_and_enforcement(cluster):
    cluster.apply([np("deny", "y", {"podSelector": {}, "policyTypes": ["Ingress"]})])
    client = cluster.lab.client()
    before_eps = {e["pod"]: (e["id"], e["identity"], e["ipv4"]) for e in client.endpoints()}
    before_ids = client.identities()
    lab = cluster.lab
    assert lab.stop_agent()
    assert not lab.status()["agent_running"]
    # While no agent runs, enforcement continues.
    cluster.expect(lambda s, d: ns_of(d) != "y")
    lab.start_agent(60)
    lab.wait_realized()
    client = lab.client()
    after_eps = {e["pod"]: (e["id"], e["identity"], e["ipv4"]) for e in client.endpoints()}
    assert after_eps == before_eps
    assert client.identities() == before_ids
    cluster.expect(lambda s, d: ns_of(d) != "y")


def test_cli_against_the_lab(cluster):
    run = [sys.executable, "-m", "cilium_py.cli.main"]
    common = ["--node", cluster.lab.name, "--run-dir", str(cluster.lab.paths.run)]
    out = subprocess.run(run + ["endpoint", "list", "-o", "json"] + common, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pods = {e["pod"] for e in json.loads(out.stdout)}
    assert "x/a" in pods and len(pods) == 9
    status = subprocess.run(run + ["status"] + common, capture_output=True, text=True)
    assert status.returncode == 0 and "Endpoints:          9" in status.stdout, status.stdout
    exe = subprocess.run(run + ["lab", "exec", "x/a", "--name", cluster.lab.name, "--", "sh", "-c", "exit 7"])
    assert exe.returncode == 7
