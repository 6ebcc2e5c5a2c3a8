"""`ciliumpy status` with a Kubernetes source: the API server's version, and per resource the
connection state, the resourceVersion, how many events and how long ago the last one."""

from __future__ import annotations

import time

from click.testing import CliRunner

from cilium_py.cli import agentapi
from cilium_py.cli.main import cli


def _status(kubernetes: dict | None) -> dict:
    s = {"node": "n1", "controllers": {},
         "datapath": {"bpf_root": "/b", "events": "ringbuf", "events_received": 0, "events_lost": 0},
         "store": {"source": "kubernetes", "objects": 4, "errors": []}, "endpoints": 0, "identities": 0,
         "policy": {"revision": 1, "realized": 1}, "map_pressure": {}, "hubble": {}, "metrics": {}}
    if kubernetes is not None:
        s["kubernetes"] = kubernetes
    return s


def _resource(state: str, **extra) -> dict:
    return {"state": state, "synced": state == "watching", "objects": 1, "rejected": 0,
            "resource_version": "", "last_event": None, "events": 0, "bookmarks": 0, "lists": 1,
            "relists": 0, "list_restarts": 0, "watches": 1, "last_error": "", "field_selector": "",
            **extra}


def test_status_shows_the_api_server_and_each_resource(monkeypatch):
    kube = {"api_server": {"host": "https://127.0.0.1:6443", "version": "v1.35.4", "version_error": ""},
            "node_name": "n1", "synced": False,
            "resources": {
                "Pod": _resource("watching", resource_version="4711", events=12, relists=2,
                                 last_event=time.time() - 5, rejected=1),
                "CiliumNode": _resource("absent", last_error="list ciliumnodes: 404 NotFound"),
                "CiliumIdentity": {"state": "skipped", "synced": False, "last_error": "no parser for this kind"},
            }}
    monkeypatch.setattr(agentapi, "call", lambda node, run_dir, method, *a: _status(kube))
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    head = next(line for line in lines if line.startswith("Kubernetes:"))
    assert "Warn" in head and "v1.35.4 at https://127.0.0.1:6443" in head and "1/2 resources synced" in head
    pod = next(line for line in lines if line.strip().startswith("Pod "))
    assert "watching" in pod and "rv 4711" in pod and "12 events" in pod and "2 relists" in pod
    assert "1 rejected" in pod
    assert "last event 5s ago" in pod or "last event 6s ago" in pod
    absent = next(line for line in lines if line.strip().startswith("CiliumNode "))
    assert "absent" in absent and "no event yet" in absent and "last error: list ciliumnodes: 404" in absent
    assert any("CiliumIdentity" in line and "skipped" in line for line in lines)


def test_status_without_kubernetes_has_no_kubernetes_section(monkeypatch):
    monkeypatch.setattr(agentapi, "call", lambda node, run_dir, method, *a: _status(None))
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    assert "Kubernetes:" not in result.output


def test_status_json_carries_the_kubernetes_section(monkeypatch):
    import json

    kube = {"api_server": {"host": "h", "version": "", "version_error": "GET /version: refused (0 x)"},
            "node_name": "", "synced": False, "resources": {"Namespace": _resource("backoff")}}
    monkeypatch.setattr(agentapi, "call", lambda node, run_dir, method, *a: _status(kube))
    result = CliRunner().invoke(cli, ["status"])
    assert "version unknown (GET /version: refused (0 x))" in result.output
    result = CliRunner().invoke(cli, ["status", "-o", "json"])
    assert json.loads(result.output)["kubernetes"]["resources"]["Namespace"]["state"] == "backoff"


def test_status_shows_what_the_agent_keeps_in_the_api_server(monkeypatch):
    kube = {"api_server": {"host": "h", "version": "v1.35.4", "version_error": ""}, "node_name": "n1",
            "synced": True, "resources": {"Pod": _resource("watching")},
            "ciliumnode": {"name": "n1", "state": "waiting-for-pod-cidr",
                           "message": "waiting for the operator to allocate a pod CIDR "
                                      "(spec.ipam.podCIDRs of CiliumNode n1)"},
            "identities": {"held": 2, "known": 5, "created": 1, "adopted": 1},
            "ciliumendpoints": {"endpoints": 3, "in_sync": 2, "writes": 4,
                                "errors": {"prod/web": "create CiliumEndpoint prod/web: forbidden (403 Forbidden)"}},
            "remote_endpoints": 7,
            "policy_status": {"valid": 4, "invalid": 1, "writes": 5, "errors": {}}}
    monkeypatch.setattr(agentapi, "call", lambda node, run_dir, method, *a: _status(kube))
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "CiliumNode:         Warn n1: waiting for the operator to allocate a pod CIDR" in out
    assert "CiliumIdentities:   2 used here, 5 in the cluster (1 created, 1 adopted)" in out
    assert "CiliumEndpoints:    2/3 written, 7 remote addresses" in out
    assert "  prod/web: create CiliumEndpoint prod/web: forbidden" in out
    assert "Policy status:      4 valid, 1 invalid" in out
