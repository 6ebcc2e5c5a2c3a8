"""One pod label change or one policy change until realized in the policy maps, at 100 and
at 1000 endpoints: the cost must follow the change, not the number of unaffected endpoints.

A real ControlPlane (store-driven, incremental regeneration) over a real compiled and
pinned datapath; the store is fed typed objects directly (namespaces, pods, 5 policies
per namespace, cluster from bench/policy_resolution.py). Endpoints have NO network
namespace or veth: the endpoint manager is replaced by one that only writes the endpoint
map and ipcache entries (fake ifindex), so endpoints exist in the BPF maps only.

Measured per change: t0, store.upsert, store.wait_idle, rev = cp.revision,
cp.wait_for_revision(rev), t1. 50 policy changes (the port of one NetworkPolicy in one
namespace) and 50 pod label changes (a label toggled on one pod, which moves it to another
identity) per level.
"""

from __future__ import annotations

import ipaddress
import shutil
import tempfile
import time

from bench.common import Result, bpf_root, remove_bpf_root

NODE_NAME = "benchpc"
POD_CIDR = "10.246.0.0/16"
ROUTER_IP = "10.246.0.1"
PODS_PER_NAMESPACE = 20
LEVELS = (100, 1000)
CHANGES = 50
MIN_CHANGES = 3
BUDGET_S = 30.0  # per kind and level, to keep the benchmark within ~3 minutes
POLICY_INDICES = (0, 1, 2, 5, 6)  # of policy_resolution.namespace_policies: ~5 per namespace
P50_TARGET_MS, P99_TARGET_MS = 50.0, 200.0
FAKE_IFINDEX_BASE = 100000


def _fake_manager_class():
    from cilium_py.agent.endpoints import EndpointError, EndpointHandle, EndpointManager

    class MapOnlyEndpointManager(EndpointManager):
        """Endpoints as endpoint-map + ipcache entries only: no namespace, veth or programs."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._by_name: dict[str, tuple[ipaddress.IPv4Address, int]] = {}
            self._next_id = 1

        def create(self, name, ip, identity):
            ip = ipaddress.IPv4Address(ip)
            if name in self._by_name:
                raise EndpointError(f"endpoint {name} exists")
            endpoint_id = self._next_id
            self._next_id += 1
            self.endpoints.upsert(ip, endpoint_id=endpoint_id, ifindex=FAKE_IFINDEX_BASE + endpoint_id,
                                  identity=identity)
            self.ipcache.upsert(ip, identity)
            self._by_name[name] = (ip, endpoint_id)
            return EndpointHandle(name, endpoint_id, ip, identity, f"fake-{name}", "fake",
                                  FAKE_IFINDEX_BASE + endpoint_id)

        def adopt(self, name, ip, identity):
            return None

        def delete(self, name):
            found = self._by_name.pop(name, None)
            if found is None:
                return None
            ip, endpoint_id = found
            self.endpoints.remove(ip)
            self.ipcache.remove(ip)
            for key in self.policy.entries(endpoint_id):
                self.policy.remove(key)
            return endpoint_id

    return MapOnlyEndpointManager


def _pct(values, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _measure_level(dp, n_endpoints: int, changes: int) -> dict:
    from bench import policy_resolution as gen
    from cilium_py.agent.controller import ControlPlane, ControlPlaneConfig
    from cilium_py.agent.policy.mapstate import PolicyWriter
    from dataclasses import replace

    from cilium_py.agent.objects import Labels, parse_object
    from cilium_py.agent.store import Store

    n_ns = n_endpoints // PODS_PER_NAMESPACE
    state_dir = tempfile.mkdtemp(prefix="ciliumpy-bench-pc-")
    store = Store()
    cp = None
    started = False
    try:
        cfg = ControlPlaneConfig(datapath=dp, node_netns=f"cpy-bench-unused-{NODE_NAME}",
                                 router_ip=ROUTER_IP, pod_cidr=POD_CIDR, state_dir=state_dir, lab=False)
        cp = ControlPlane(cfg, store)
        # Swap in the namespace-free endpoint manager (and the writer that holds its maps).
        cp.manager.close()
        cp.manager = _fake_manager_class()(dp, cfg.node_netns, ROUTER_IP)
        cp.writer = PolicyWriter(cp.manager.policy, cp.manager.endpoints)

        pods = []
        for res in gen.namespace_resources(n_ns):
            store.upsert(res)
        for i in range(n_ns):
            for pod in gen.pod_resources(i, PODS_PER_NAMESPACE, node=NODE_NAME):
                store.upsert(pod)
                pods.append(pod)
            all_pols = gen.namespace_policies(i)
            for idx in POLICY_INDICES:
                store.upsert(parse_object(all_pols[idx][3], "bench"))
        store.wait_idle()
        t0 = time.perf_counter()
        cp.start()
        started = True
        if not cp.wait_for_revision(cp.revision, 600):
            raise RuntimeError(f"initial regeneration of {n_endpoints} endpoints not realized in 600 s")
        initial_s = time.perf_counter() - t0
        if len(cp.endpoints) != n_endpoints:
            raise RuntimeError(f"{len(cp.endpoints)} endpoints realized, expected {n_endpoints}")
        total_entries = sum(ep.rule_count for ep in cp.endpoints.values())
        map_entries = len(cp.manager.policy.keys())

        timeouts = 0

        def timed(res) -> float:
            nonlocal timeouts
            t0 = time.perf_counter()
            store.upsert(res)
            store.wait_idle()
            rev = cp.revision
            if not cp.wait_for_revision(rev, 10):
                timeouts += 1  # counted; keep waiting so the next sample starts clean
                cp.wait_for_revision(rev, 300)
            return (time.perf_counter() - t0) * 1000

        # The same changes at every level (namespaces 0-4), so only the number of
        # unaffected endpoints differs; each kind stops early after BUDGET_S.
        policy_ms = []
        t_kind = time.perf_counter()
        for k in range(changes):
            if len(policy_ms) >= MIN_CHANGES and time.perf_counter() - t_kind > BUDGET_S:
                break
            i = k % 5
            body = gen.namespace_policies(i, api_port=8100 + k)[1][3]
            policy_ms.append(timed(parse_object(body, "bench")))

        label_ms = []
        current = {p.key: p for p in pods}
        t_kind = time.perf_counter()
        for k in range(changes):
            if len(label_ms) >= MIN_CHANGES and time.perf_counter() - t_kind > BUDGET_S:
                break
            # Pod (k // 5) of namespace k % 5: some toggles create a new identity (the first
            # pod of an app/version gaining the label), others join an existing one.
            pod = current[pods[(k % 5) * PODS_PER_NAMESPACE + (k // 5) % PODS_PER_NAMESPACE].key]
            labels = dict(pod.labels)
            if labels.pop("canary", None) is None:
                labels["canary"] = "true"
            new = replace(pod, labels=Labels(labels))
            current[pod.key] = new
            label_ms.append(timed(new))
        return {"initial_s": initial_s, "policy": policy_ms, "label": label_ms,
                "timeouts": timeouts, "map_entries": map_entries, "rules": total_entries,
                "runs": cp.controllers.get("policy-regeneration").runs}
    finally:
        if started:
            cp.stop()
        if cp is not None:
            try:
                # Leave the shared maps empty for the next level.
                cp.manager.policy.clear()
                cp.manager.endpoints.clear()
                cp.manager.ipcache.map.clear()
            finally:
                cp.close()
        store.close()
        shutil.rmtree(state_dir, ignore_errors=True)


def run(quick: bool = False) -> list[Result]:
    from cilium_py.datapath import loader
    from cilium_py.datapath.config import DatapathConfig

    changes = 10 if quick else CHANGES
    levels = (100, 200) if quick else LEVELS
    root = bpf_root("pc")
    loaded = None
    try:
        dp = DatapathConfig(node=NODE_NAME, bpf_root=root)
        loaded = loader.load(dp, pin_programs=True)
        got = {}
        for level in levels:
            t = time.perf_counter()
            got[level] = _measure_level(dp, level, changes)
            print(f"   level {level}: {time.perf_counter() - t:.1f} s (initial regeneration "
                  f"{got[level]['initial_s']:.1f} s)", flush=True)
    finally:
        if loaded is not None:
            loaded.close()
        remove_bpf_root(root)

    lo, hi = levels
    rows = []
    for kind, what in (("policy", "one NetworkPolicy port change"), ("label", "one pod label toggle")):
        p50 = {lv: _pct(got[lv][kind], 0.50) for lv in levels}
        p99 = {lv: _pct(got[lv][kind], 0.99) for lv in levels}
        growth = p50[hi] / p50[lo]
        met = all(p50[lv] <= P50_TARGET_MS and p99[lv] <= P99_TARGET_MS for lv in levels)
        rows.append(Result(
            f"policy_change: {kind}, {hi} endpoints",
            f"p50 {p50[hi]:.1f} ms, p99 {p99[hi]:.1f} ms (n={len(got[hi][kind])})",
            f"p50 {p50[lo]:.1f} ms, p99 {p99[lo]:.1f} ms at {lo} (n={len(got[lo][kind])})",
            growth, f"p50 <= {P50_TARGET_MS:.0f} ms, p99 <= {P99_TARGET_MS:.0f} ms at both", met,
            [f"{what}, up to {changes} changes per level (fewer if they exceed {BUDGET_S:.0f} s), "
             f"upsert until wait_for_revision; "
             f"ratio = p50 growth {hi}/{lo} endpoints (should be ~1x)"]))
    rows[0].notes += [
        "endpoints exist only in the BPF maps (endpoint map + ipcache, fake ifindex): no network "
        "namespaces or veths; the datapath is really compiled, loaded and pinned",
        f"datapath compile once: {loaded.compile_seconds:.1f} s"] + [
        f"{lv} endpoints: initial regeneration {got[lv]['initial_s']:.1f} s, "
        f"{got[lv]['map_entries']} policy-map entries, {got[lv]['timeouts']} timeouts, "
        f"{got[lv]['runs']} regenerations" for lv in levels]
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)