"""The service manager writing the session datapath's real lb maps through BpfWriter (batch
updates and deletes), read back with the map wrappers and with `ciliumpy bpf lb`."""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cilium_py.agent.objects import parse_object
from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.maglev import build_table
from cilium_py.agent.services.manager import ServiceManager
from cilium_py.agent.services.writer import BpfWriter
from cilium_py.agent.store import Store
from cilium_py.cli.main import cli
from cilium_py.datapath import libbpf
from cilium_py.datapath.maps.lb import (
    ALGORITHM_MAGLEV,
    BE_STATE_TERMINATING,
    SCOPE_INTERNAL,
    SVC_F_NODEPORT,
    SVC_F_TWO_SCOPES,
    BackendsMap,
    MaglevMap,
    RevNatMap,
    ServicesMap,
    frontend,
)

pytestmark = [pytest.mark.bpf]

NODE_IP = "10.245.7.1"


@pytest.fixture
def lb(datapath):
    pin = datapath.config.pin_dir
    maps = (ServicesMap(pin), BackendsMap(pin), RevNatMap(pin), MaglevMap(pin, datapath.config.maglev_table_size))
    for m in maps:
        m.clear()
    store = Store()
    writer = BpfWriter(pin, datapath.config.maglev_table_size)
    config = ServiceConfig(node="bpftest", node_ips=(NODE_IP,), maglev_table_size=datapath.config.maglev_table_size)
    manager = ServiceManager(store, writer, config)
    yield store, manager, maps
    manager.stop()
    manager.close()
    store.close()
    for m in maps:
        m.clear()
        m.close()


def put_service(store, name, cluster_ip, addresses, annotations=None, **spec):
    spec = {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                                 "protocol": "TCP", **spec.pop("port", {})}], **spec}
    meta = {"name": name, "namespace": "shop", **({"annotations": annotations} if annotations else {})}
    store.upsert(parse_object({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}, "t.yaml"))
    labels = {"kubernetes.io/service-name": name}
    eps = [{"addresses": [a], **({"conditions": c} if c else {}), **({"nodeName": n} if n else {})}
           for a, c, n in ((x, None, None) if isinstance(x, str) else x for x in addresses)]
    store.upsert(parse_object({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "labels": labels}, "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}], "endpoints": eps}, "t.yaml"))


def sync(store, manager):
    store.wait_idle(5)
    return manager.sync()


def test_services_programmed_into_the_real_maps(lb):
    store, manager, (services, backends, revnat, maglev) = lb
    put_service(store, "web", "10.96.0.10", ["10.244.1.5", "10.244.1.6",
                                             ("10.244.1.7", {"terminating": True}, None)])
    put_service(store, "edge", "10.96.0.11", [("10.244.1.5", None, "bpftest"), ("10.244.9.5", None, "n2")],
                annotations={"service.cilium.io/lb-algorithm": "maglev"}, type="NodePort",
                externalTrafficPolicy="Local", port={"nodePort": 30080})
    sync(store, manager)
    web = services.get(frontend("10.96.0.10", 80, 6))
    be = {b.backend_id: b for b in backends.list()}
    assert [str(be[i].address) for i in web.backend_ids] == ["10.244.1.5", "10.244.1.6"]
    terminating = [b for b in be.values() if str(b.address) == "10.244.1.7"]
    assert len(terminating) == 1 and terminating[0].state == BE_STATE_TERMINATING
    assert [(sid, str(a), p) for sid, a, p in revnat.list() if sid == web.service_id] == [(web.service_id, "10.96.0.10", 80)]
    ext = services.get(frontend(NODE_IP, 30080, 6))
    internal = services.get(frontend(NODE_IP, 30080, 6, SCOPE_INTERNAL))
    assert ext.flags & SVC_F_NODEPORT and ext.flags & SVC_F_TWO_SCOPES and ext.algorithm == ALGORITHM_MAGLEV
    assert [str(be[i].address) for i in ext.backend_ids] == ["10.244.1.5"]
    assert sorted(str(be[i].address) for i in internal.backend_ids) == ["10.244.1.5", "10.244.9.5"]
    assert services.get(frontend("0.0.0.0", 30080, 6)) is not None
    table = maglev.get_table(ext.service_id)
    expected = build_table([("10.244.1.5:8080/TCP", ext.backend_ids[0])], maglev.table_size,
                           manager.config.maglev_seed)
    assert np.array_equal(table, expected)
    # What the manager thinks the maps hold is what they hold.
    entries = {(str(e.frontend.address), e.frontend.port, e.frontend.scope): e.backend_ids for e in services.list()}
    assert len(entries) == 6  # web, edge ClusterIP, edge NodePort x (node IP ext + int, 0.0.0.0 ext + int)

    # Changes: one backend goes, the maps shrink, the deleted backend's entry goes.
    put_service(store, "web", "10.96.0.10", ["10.244.1.6"])
    sync(store, manager)
    web = services.get(frontend("10.96.0.10", 80, 6))
    assert [str(backends.get(i).address) for i in web.backend_ids] == ["10.244.1.6"]
    assert {str(b.address) for b in backends.list()} == {"10.244.1.5", "10.244.1.6", "10.244.9.5"}
    store.delete(("Service", "shop", "edge"))
    sync(store, manager)
    assert [str(e.frontend.address) for e in services.list()] == ["10.96.0.10"]
    assert maglev.service_ids() == [] and [sid for sid, _, _ in revnat.list()] == [web.service_id]


def test_restarted_manager_adopts_the_maps(lb, datapath):
    store, manager, (services, backends, *_) = lb
    put_service(store, "web", "10.96.0.10", ["10.244.1.5", "10.244.1.6"])
    sync(store, manager)
    before = services.get(frontend("10.96.0.10", 80, 6))
    manager.stop()
    second_store = Store()
    second = ServiceManager(second_store, BpfWriter(datapath.config.pin_dir, datapath.config.maglev_table_size),
                            manager.config)
    try:
        put_service(second_store, "web", "10.96.0.10", ["10.244.1.5", "10.244.1.6"])
        changes = sync(second_store, second)
        assert changes.writes() == 0, changes.counts()  # everything was there already
        assert services.get(frontend("10.96.0.10", 80, 6)) == before
    finally:
        second.stop()
        second.close()
        second_store.close()


def test_batch_helpers_on_a_real_map(lb):
    _, _, (services, backends, *_) = lb
    keys = np.array([1, 2, 3], np.uint32)
    values = np.zeros(3, dtype=np.dtype((np.void, ctypes.sizeof(backends.VALUE))))
    assert libbpf.map_update_batch(backends.fd, keys, values, 3) == 3
    assert sorted(b.backend_id for b in backends.list()) == [1, 2, 3]
    # A missing key stops a batch delete there; the writer goes on after it.
    with pytest.raises(OSError) as e:
        libbpf.map_delete_batch(backends.fd, np.array([1, 9, 2], np.uint32), 3)
    assert e.value.done == 1
    writer = BpfWriter(services.path.rsplit("/", 1)[0], 251)
    try:
        writer._delete(backends, np.array([9, 2, 8, 3], np.uint32))
    finally:
        writer.close()
    assert backends.list() == []


def test_bpf_lb_cli_reads_the_maps(lb, datapath):
    store, manager, _ = lb
    put_service(store, "web", "10.96.0.10", ["10.244.1.5"], annotations={"service.cilium.io/lb-algorithm": "maglev"})
    sync(store, manager)
    args = ["--node", datapath.config.node, "--bpf-root", datapath.config.bpf_root, "-o", "json"]
    rows = json.loads(CliRunner().invoke(cli, ["bpf", "lb", "list", *args]).output)
    assert [(r["service"], r.get("backend_address")) for r in rows] == [
        ("10.96.0.10:80/TCP (0)", None), ("10.96.0.10:80/TCP (1)", "10.244.1.5:8080/TCP")]
    sid = rows[0]["service_id"]
    out = json.loads(CliRunner().invoke(cli, ["bpf", "lb", "maglev", "get", str(sid), *args]).output)
    assert out["table_size"] == datapath.config.maglev_table_size
    assert out["distribution"] == {str(rows[1]["backend_id"]): datapath.config.maglev_table_size}


def test_removed_frontend_takes_its_nat_entries_along(lb, datapath):
    """Open NodePort connections are translated from the NAT map alone: when their frontend
    goes, its entries must go too, or the old flows keep being forwarded."""
    import ctypes

    from cilium_py.datapath.maps.conntrack import CtTuple4
    from cilium_py.datapath.maps.nat import NatEntry4, NatMap

    store, manager, (services, *_rest) = lb
    put_service(store, "edge", "10.96.0.11", ["10.244.1.5"], type="NodePort",
                port={"nodePort": 30081})
    put_service(store, "web", "10.96.0.10", ["10.244.1.6"])
    sync(store, manager)
    edge_id = services.get(frontend(NODE_IP, 30081, 6)).service_id
    web_id = services.get(frontend("10.96.0.10", 80, 6)).service_id
    nat = NatMap(datapath.config.pin_dir)
    try:
        nat.clear()
        for sport, sid in ((40000, edge_id), (40001, web_id)):
            nat.update(CtTuple4(saddr=0x0A2D0002, daddr=0x0A2D0001, sport=sport, dport=30081,
                                nexthdr=6), NatEntry4(rev_nat_index=sid))
        store.delete(("Service", "shop", "edge"))
        sync(store, manager)
        assert sorted(v.rev_nat_index for _, v in nat.items()) == [web_id]
    finally:
        nat.clear()
        nat.close()
