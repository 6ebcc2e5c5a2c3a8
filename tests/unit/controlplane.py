"""A node's control plane on the in-memory backend, for regeneration tests without root,
and a normal form of everything it realized (policy entries, enforcement, ipcache,
endpoint states) in which an incremental run and a fresh one must be equal.

Identity numbers, endpoint IDs and cookies depend on the order things were allocated in,
so the normal form names peers by their labels (or CIDR), endpoints by their pod and
entries' cookies by their policy."""

from __future__ import annotations

import yaml

from cilium_py.agent.backend import memory_backend
from cilium_py.agent.controller import ControlPlane, ControlPlaneConfig
from cilium_py.agent.labels import labels_key
from cilium_py.agent.sources.manifests import parse_documents
from cilium_py.agent.store import Store
from cilium_py.datapath.config import DatapathConfig

NODE = "n1"


class MemoryNode:
    def __init__(self, state_dir, policy_map_max_entries: int = 65536, budget: int = 16384):
        self.store = Store(workers=1)
        self.backend = memory_backend(policy_map_max_entries)
        config = ControlPlaneConfig(
            datapath=DatapathConfig(node=NODE, bpf_root="/nonexistent"), node_netns="mem",
            router_ip="10.200.0.1", pod_cidr="10.200.0.0/24", state_dir=str(state_dir),
            policy_map_max=budget)
        self.control = ControlPlane(config, self.store, self.backend)

    def close(self) -> None:
        self.store.close()

    def apply(self, *docs: dict, source: str = "test.yaml") -> None:
        objects, errors = parse_documents(yaml.safe_dump_all(list(docs)), source)
        assert not errors, errors
        for obj in objects:
            self.store.upsert(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.store.delete((kind, namespace, name))

    def sync(self) -> None:
        """Lets the store's callbacks land, then runs one regeneration pass."""
        self.store.wait_idle(5.0)
        self.control.reconciler.run_once()

    def endpoint(self, pod_key: str):
        return self.control.endpoints[pod_key]

    def entries(self, pod_key: str) -> dict:
        ep = self.endpoint(pod_key)
        return self.backend.policy_map.entries(ep.handle.endpoint_id)

    def enforcement(self, pod_key: str) -> tuple[bool, bool]:
        ep = self.backend.endpoint_map.get(self.endpoint(pod_key).handle.ip)
        return ep.ingress_enforced, ep.egress_enforced

    def ipcache_identity(self, ip: str) -> int | None:
        return self.backend.ipcache.map.get(ip)

    # -- the normal form ---------------------------------------------------------------

    def _peer(self, identity: int) -> str:
        if identity == 0:
            return "any"
        labels = self.control.identities.lookup(identity)
        return repr(labels_key(labels)) if labels is not None else f"unknown:{identity}"

    def realized(self) -> dict:
        pods = {ep.handle.endpoint_id: key for key, ep in self.control.endpoints.items()}
        repo = self.control.repo
        entries = set()
        for key, value in self.backend.policy_map.data.items():
            entries.add((pods.get(key.endpoint_id, f"orphan:{key.endpoint_id}"), self._peer(key.identity),
                         key.direction, key.protocol, key.port, key.port_prefix, value.deny,
                         repo.cookie_key(value.cookie) if value.cookie else None))
        enforcement = {key: self.enforcement(key) for key in self.control.endpoints}
        # Pod addresses come from IPAM in allocation order: named by their pod instead.
        by_ip = {f"{ep.handle.ip}/32": f"pod:{key}" for key, ep in self.control.endpoints.items()}
        ipcache = {by_ip.get(str(prefix), str(prefix)): self._peer(identity)
                   for prefix, identity in self.backend.ipcache.map.data.items()}
        states = {key: ep.state for key, ep in self.control.endpoints.items()}
        return {"entries": entries, "enforcement": enforcement, "ipcache": ipcache, "states": states}

    def fresh(self, state_dir) -> "MemoryNode":
        """A new node given the same objects, regenerated from scratch."""
        other = MemoryNode(state_dir, self.backend.policy_map.max_entries, self.control.writer.budget)
        for kind in ("Namespace", "Pod", "NetworkPolicy", "CiliumNetworkPolicy",
                     "CiliumClusterwideNetworkPolicy"):
            for obj in self.store.list(kind):
                other.store.upsert(obj)
        other.sync()
        return other

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def namespace(name: str, **labels) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(ns: str, name: str, **labels) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"nodeName": NODE, "containers": [{"name": "c", "ports": [
               {"name": "http", "containerPort": 80, "protocol": "TCP"}]}]}}
