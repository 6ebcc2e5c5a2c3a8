"""Service programming cost: 10,000 Services with 5 backends each (an EndpointSlice each)
from the store into the real lb maps, and one Service added next to them (p50 of many).

    .venv/bin/python -m bench.lb_services [--services 10000] [--backends 5] [--adds 50]

Runs against a datapath of its own under /sys/fs/bpf/ciliumpy-bench-<random>/ (removed at
the end). Prints the full sync split into planning and map writes, and the incremental
add. Not part of `make bench`'s default set (it needs no traffic; numbers are absolute).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import statistics
import time
import uuid

from cilium_py.agent.services.config import ServiceConfig
from cilium_py.agent.services.manager import ServiceManager
from cilium_py.agent.services.writer import BpfWriter
from cilium_py.agent.objects import EndpointSlice, Service, parse_object
from cilium_py.agent.store import Store
from cilium_py.datapath import loader
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.lb import ServicesMap


def service(i: int) -> Service:
    ip = str(ipaddress.IPv4Address("10.96.0.0") + 1 + i)
    body = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": "bench"},
            "spec": {"clusterIP": ip, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    return parse_object(body, "bench")


def endpoint_slice(i: int, backends: int) -> EndpointSlice:
    base = ipaddress.IPv4Address("10.200.0.0") + i * backends
    labels = {"kubernetes.io/service-name": f"svc-{i}"}
    body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}-x", "namespace": "bench", "labels": labels},
            "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [str(base + b)], "conditions": {"ready": True}}
                          for b in range(backends)]}
    return parse_object(body, "bench")


class Timed:
    """Wraps the writer to time the map writes apart from planning."""

    def __init__(self, writer):
        self.writer = writer
        self.seconds = 0.0

    def apply(self, changes):
        started = time.perf_counter()
        self.writer.apply(changes)
        self.seconds += time.perf_counter() - started

    def dump(self):
        return self.writer.dump()

    def close(self):
        self.writer.close()


def run(n_services: int, n_backends: int, adds: int) -> dict:
    root = f"/sys/fs/bpf/ciliumpy-bench-{uuid.uuid4().hex[:6]}"
    os.makedirs(root)
    store = Store()
    try:
        config = DatapathConfig(node="bench", bpf_root=root)
        loaded = loader.load(config, pin_programs=False)
        writer = Timed(BpfWriter(config.pin_dir, config.maglev_table_size))
        manager = ServiceManager(store, writer, ServiceConfig(node="bench", lb_map_max=config.lb_map_max))
        manager.sync()  # the (empty) restore
        for i in range(n_services):
            store.upsert(service(i))
            store.upsert(endpoint_slice(i, n_backends))
        store.wait_idle()
        started = time.perf_counter()
        changes = manager.sync()
        full = time.perf_counter() - started
        write = writer.seconds
        with ServicesMap(config.pin_dir) as services:
            entries = len(services)
        assert entries == n_services * (1 + n_backends), entries
        one = []
        for k in range(adds):
            i = n_services + k
            store.upsert(service(i))
            store.upsert(endpoint_slice(i, n_backends))
            store.wait_idle()
            started = time.perf_counter()
            added = manager.sync()
            one.append(time.perf_counter() - started)
            # One master, its slots, their backends and the reverse-NAT entry; nothing else.
            assert added.counts() == {**dict.fromkeys(added.counts(), 0), "masters": 1, "slots": n_backends,
                                      "backends": n_backends, "revnat": 1}, added.counts()
            # Back to n_services, so every add happens next to the same number of services.
            store.delete(("Service", "bench", f"svc-{i}"))
            store.delete(("EndpointSlice", "bench", f"svc-{i}-x"))
            store.wait_idle()
            manager.sync()
        manager.close()
        loaded.close()
        return {"services": n_services, "backends_each": n_backends, "full_sync_s": full,
                "full_write_s": write, "full_plan_s": full - write, "writes": changes.writes(),
                "add_one_p50_ms": statistics.median(one) * 1000,
                "add_one_p90_ms": sorted(one)[int(len(one) * 0.9)] * 1000}
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--backends", type=int, default=5)
    parser.add_argument("--adds", type=int, default=50)
    args = parser.parse_args()
    r = run(args.services, args.backends, args.adds)
    print(f"{r['services']} services x {r['backends_each']} backends: full sync {r['full_sync_s']:.3f} s "
          f"(plan {r['full_plan_s']:.3f} s, map writes {r['full_write_s']:.3f} s, {r['writes']} entries); "
          f"one service added: p50 {r['add_one_p50_ms']:.2f} ms, p90 {r['add_one_p90_ms']:.2f} ms")


if __name__ == "__main__":
    main()
