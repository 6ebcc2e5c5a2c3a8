"""A policy map that cannot hold every endpoint's policy, in the kernel: the control plane
drives the pinned maps of a datapath compiled with a small policy map, and real programs
(BPF_PROG_TEST_RUN) judge packets. The issue's case, scaled down: many CIDRs on a few ports
plus the namespace's own pods on port 80, more than the map holds. Endpoints that fit
enforce their policy; the others deny everything and say why; none is left open; a later
write the kernel refuses is rolled back to the previous policy."""

from __future__ import annotations

import shutil

import pytest
import yaml

from cilium_py.agent.backend import pinned_maps_backend
from cilium_py.agent.controller import NOT_READY, READY, ControlPlane, ControlPlaneConfig
from cilium_py.agent.sources.manifests import parse_documents
from cilium_py.agent.store import Store
from cilium_py.datapath import loader, testrun
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.policy import PolicyMap
from cilium_py.datapath.testrun import TC_ACT_OK, TC_ACT_SHOT

from . import packets as pk

pytestmark = [pytest.mark.bpf]

TO = "cil_to_container"
TEST_RUN_IFINDEX = 1  # tc programs run on loopback under BPF_PROG_TEST_RUN
NODE = "mapfull"
PER_ENDPOINT = 16     # --bpf-policy-map-max of the datapath: a map of 16 * 64 = 1024 entries
OUTSIDE = "10.251.0.9"  # a pod of another namespace, known to the ipcache by its identity


@pytest.fixture(scope="module")
def small_datapath(privileged, bpf_root):
    config = DatapathConfig(node=NODE, bpf_root=bpf_root, policy_map_max=PER_ENDPOINT)
    loaded = loader.load(config)
    yield loaded
    loaded.close()
    shutil.rmtree(config.pin_dir, ignore_errors=True)


@pytest.fixture
def node(small_datapath, tmp_path):
    pin_dir = small_datapath.config.pin_dir
    with PolicyMap(pin_dir) as policy:
        policy.clear()
    store = Store(workers=1)
    backend = pinned_maps_backend(pin_dir, TEST_RUN_IFINDEX)
    # The per-endpoint budget above the map's size: the shared map's capacity is what runs out.
    control = ControlPlane(ControlPlaneConfig(
        datapath=small_datapath.config, node_netns="unused", router_ip="10.251.1.1",
        pod_cidr="10.251.1.0/24", state_dir=str(tmp_path), policy_map_max=1000), store, backend)
    yield store, control
    for key in list(control.endpoints):
        control._remove_endpoint(key)
    control.close()
    store.close()


def apply(store: Store, control: ControlPlane, docs: list[dict]) -> None:
    objects, errors = parse_documents(yaml.safe_dump_all(docs), "test.yaml")
    assert not errors, errors
    for obj in objects:
        store.upsert(obj)
    store.wait_idle(5.0)
    control.reconciler.run_once()


def pods(n: int) -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "y"}},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "outside", "namespace": "y"},
             "spec": {"nodeName": "elsewhere", "containers": [{"name": "c"}]}}] + [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": f"p{i}", "namespace": "x", "labels": {"app": "web"}},
         "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]}}
        for i in range(n)]


def many_cidrs_policy(count: int) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "many", "namespace": "x"},
            "spec": {"endpointSelector": {}, "ingress": [
                {"fromCIDR": [f"198.51.{i // 250}.{i % 250}/32" for i in range(count)],
                 "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
                {"fromEndpoints": [{}], "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}}


def syn(datapath, src: str, dst: str, dport: int) -> int:
    return testrun.run(datapath.fd(TO), pk.tcp(src, dst, 40000, dport)).retval


def test_full_policy_map_leaves_endpoints_closed_and_says_why(small_datapath, node):
    store, control = node
    apply(store, control, pods(4))
    assert {ep.state for ep in control.endpoints.values()} == {READY}
    # An address of another namespace's identity (a pod of another node, as the ipcache
    # would know it).
    outside_identity = control.identities.acquire({"k8s:io.kubernetes.pod.namespace": "y"})
    control.ipcache.upsert(OUTSIDE, outside_identity, "custom-resource")

    apply(store, control, [many_cidrs_policy(300)])  # ~300 entries per endpoint, 1024 in all
    states = {k: ep.state for k, ep in control.endpoints.items()}
    assert sorted(states.values()) == [NOT_READY, READY, READY, READY], states
    failed = control.failed_endpoints()
    (key, why), = failed.items()
    # It allowed everything before (no policy selected it): now it denies all ingress.
    assert "policy map full" in why and "denying all ingress traffic" in why
    peer = control.endpoints[next(k for k in states if k != key)]
    for pod_key, ep in control.endpoints.items():
        ip = str(ep.handle.ip)
        assert syn(small_datapath, OUTSIDE, ip, 80) == TC_ACT_SHOT, f"{pod_key} let another namespace in"
        allowed = syn(small_datapath, str(peer.handle.ip), ip, 80) if ep is not peer else TC_ACT_OK
        assert allowed == (TC_ACT_SHOT if pod_key == key else TC_ACT_OK), pod_key


def test_write_the_kernel_refuses_is_rolled_back_to_the_previous_policy(small_datapath, node):
    store, control = node
    apply(store, control, pods(2))
    apply(store, control, [many_cidrs_policy(100)])
    assert not control.failed_endpoints()
    a = control.endpoints["x/p0"]
    before = PolicyMap(small_datapath.config.pin_dir)
    try:
        entries_before = before.entries(a.handle.endpoint_id)
        # Someone else (another writer of the same pinned map) fills what is left, so the
        # controller's own count passes and the kernel refuses the insert.
        for i in range(before.max_entries - control.writer.entry_count()):
            before.allow(999, 5000 + i, 443, 6, "ingress")
        apply(store, control, [many_cidrs_policy(110)])
        failed = control.failed_endpoints()
        assert set(failed) == {"x/p0", "x/p1"}
        assert all("No space left on device" in why and "previous ingress policy kept" in why
                   for why in failed.values()), failed
        assert before.entries(a.handle.endpoint_id) == entries_before
        assert syn(small_datapath, str(control.endpoints["x/p1"].handle.ip), str(a.handle.ip), 80) == TC_ACT_OK
        for key in before.entries(999):
            before.remove(key)
    finally:
        before.close()
