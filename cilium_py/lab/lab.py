"""`ciliumpy lab`: the whole thing on one machine (DESIGN.md §6).

A lab is a directory under /var/run/ciliumpy/lab/<name>/ holding its manifests (the
directory the agent watches), the agent's state and run files, and lab.json (node index,
agent pid). `up` creates the node namespace and starts the agent in lab mode; `apply` and
`delete` edit the manifests like kubectl would and wait until the new policy revision is
realized; `exec` runs a command inside a pod (its network namespace and the lab's cgroup);
`down` removes everything the lab created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from cilium_py import defaults
from cilium_py.agent.client import AgentClient
from cilium_py.agent.paths import RunPaths, endpoint_name, pod_netns
from cilium_py.datapath import netns
from cilium_py.lab.agentproc import AgentProcess, AgentProcessError
from cilium_py.lab.harness import remove_pins, running_node
from cilium_py.lab.listeners import LabListeners
from cilium_py.lab.node import LabNode
from cilium_py.lab.process import alive, stop_pid

LAB_ROOT = os.path.join(defaults.RUN_DIR, "lab")
DEFAULT_LAB = "lab"
DEFAULT_HUBBLE_SOCKET = os.path.join(defaults.RUN_DIR, "hubble.sock")
CGROUP_ROOT = "/sys/fs/cgroup/unified"
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
WORLD_PORT = 80


class LabError(RuntimeError):
    """What went wrong, in terms of the lab; the CLI prints it as is."""


@dataclass
class LabPaths:
    root: Path

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def info(self) -> Path:
        return self.root / "lab.json"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"


def manifest_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())
        if not files:
            raise LabError(f"{path} holds no .yaml, .yml or .json files")
        return files
    if not path.exists():
        raise LabError(f"{path} does not exist")
    return [path]


def _object_keys(path: Path) -> set[tuple[str, str, str]]:
    keys = set()
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as e:
        raise LabError(f"{path}: not valid YAML: {e}") from None
    for doc in docs:
        if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
            meta = doc["metadata"]
            keys.add((str(doc.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name"))))
    return keys


class Lab:
    def __init__(self, name: str = "lab", root: str = LAB_ROOT,
                 bpf_root: str = defaults.BPF_ROOT):
        if not name or not name.replace("-", "").isalnum() or len(name) > 12:
            raise LabError(f"lab name {name!r}: use up to 12 letters, digits or '-'")
        self.name = name
        self.paths = LabPaths(Path(root) / name)
        self.run_paths = RunPaths(str(self.paths.run), name)  # the agent's sockets and files
        self.bpf_root = bpf_root

    # -- state --------------------------------------------------------------------------

    def _info(self) -> dict:
        if not self.paths.info.exists():
            raise LabError(f"lab {self.name} is not up (no {self.paths.info}); run `ciliumpy lab up -f DIR`")
        return json.loads(self.paths.info.read_text())

    def _node(self, info: dict | None = None) -> LabNode:
        info = info or self._info()
        return LabNode(self.name, info["index"])

    @property
    def cgroup(self) -> str:
        return os.path.join(CGROUP_ROOT, f"ciliumpy-lab-{self.name}")

    def client(self, timeout: float = 60.0) -> AgentClient:
        return AgentClient(self.run_paths.api_socket, timeout=timeout)

    @staticmethod
    def _free_index() -> int:
        used = set()
        if os.path.isdir(LAB_ROOT):
            for entry in os.listdir(LAB_ROOT):
                info = Path(LAB_ROOT) / entry / "lab.json"
                if info.exists():
                    used.add(json.loads(info.read_text())["index"])
        for index in range(10, 250):
            if index not in used:
                return index
        raise LabError("no free lab node index")

    # -- up / down ----------------------------------------------------------------------

    def up(self, manifests: str | Path, timeout: float = 120.0) -> dict:
        if self.paths.info.exists():
            raise LabError(f"lab {self.name} is already up; `ciliumpy lab down --name {self.name}` first")
        files = manifest_files(manifests)
        index = self._free_index()
        node = LabNode(self.name, index)
        for path in (self.paths.manifests, self.paths.state, self.paths.run):
            path.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, self.paths.manifests / f.name)
        info = {"index": index, "agent_pid": 0, "node_netns": node.netns, "bpf_root": self.bpf_root}
        self.paths.info.write_text(json.dumps(info))

        def prepare(handle) -> None:
            os.makedirs(self.cgroup, exist_ok=True)
            # A listener outside the node, so policies about the world can be tried.
            info["world_pid"] = handle.listen(node.ext_netns, "world", tcp=(WORLD_PORT,), detached=True).pid

        try:
            with running_node(node, bpf_root=self.bpf_root, run_dir=str(self.paths.run),
                              agent=self._agent(node), prepare=prepare, ready_timeout=timeout) as handle:
                info["agent_pid"] = handle.agent.pid
                self.paths.info.write_text(json.dumps(info))
                self._link_default_hubble_socket()
                result = self.wait_realized(timeout)
                handle.keep()  # the lab runs on after `lab up` returns; `lab down` removes it
            return result
        except AgentProcessError as e:
            self.down()
            raise LabError(f"the lab agent did not start: {e}") from None
        except BaseException:
            self.down()
            raise

    @property
    def hubble_socket(self) -> Path:
        return Path(self.run_paths.hubble_socket)

    @property
    def hubble_server(self) -> str:
        """What `hubble observe --server` takes to reach this lab's agent."""
        return f"unix://{self.hubble_socket}"

    def _link_default_hubble_socket(self) -> None:
        """The default lab answers at hubble's default address, so a bare `hubble observe`
        works after `ciliumpy lab up`; a socket some other agent owns is left alone."""
        if self.name != DEFAULT_LAB:
            return
        link = Path(DEFAULT_HUBBLE_SOCKET)
        if link.is_symlink() and not link.exists():
            link.unlink()  # left by a lab that is gone
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.hubble_socket)

    def _unlink_default_hubble_socket(self) -> bool:
        link = Path(DEFAULT_HUBBLE_SOCKET)
        if link.is_symlink() and os.readlink(link) == str(self.hubble_socket):
            link.unlink()
            return True
        return False

    def world_ip(self) -> str:
        return str(self._node().addressing.world_ip)

    def node_ip(self) -> str:
        """The node's address on its uplink: where the outside reaches NodePorts."""
        return str(self._node().addressing.uplink_ip)

    def _agent(self, node: LabNode) -> AgentProcess:
        a = node.addressing
        return AgentProcess.for_node(
            node, bpf_root=self.bpf_root, run_dir=str(self.paths.run), log_path=str(self.paths.agent_log),
            detached=True,  # the agent keeps running after `lab up` returns
            extra_args=("--manifests", str(self.paths.manifests), "--pod-cidr", str(a.pod_cidr),
                        "--router-ip", str(a.router_ip), "--state-dir", str(self.paths.state), "--lab",
                        # Socket LB on the lab's own cgroup, the one `lab exec` runs commands in.
                        "--cgroup-root", self.cgroup,
                        # Ephemeral ports: several labs may run at once; `lab status` shows the ports.
                        "--prometheus-serve-addr", "127.0.0.1:0", "--hubble-metrics-server", "127.0.0.1:0",
                        "--hubble-metrics", "drop,tcp,flow,icmp,port-distribution"))

    def start_agent(self, timeout: float = 60.0) -> None:
        """Starts the lab's agent again (after `stop_agent`); returns once it is ready."""
        info = self._info()
        agent = self._agent(self._node(info))
        try:
            agent.start(timeout)
        except AgentProcessError as e:
            raise LabError(f"the lab agent did not start: {e}") from None
        info["agent_pid"] = agent.pid
        self.paths.info.write_text(json.dumps(info))

    def stop_agent(self) -> bool:
        """Stops the lab's agent; programs, maps, pods and listeners stay. Returns whether it ran."""
        return stop_pid(self._info()["agent_pid"])

    def wait_realized(self, timeout: float = 60.0) -> dict:
        """Waits until every endpoint realizes the policy revision the agent has now."""
        client = self.client(timeout + 5)
        client.get("/v1/sync")
        revision = client.policy()["revision"]
        result = client.wait_revision(revision, timeout)
        if not result["realized"]:
            raise LabError(f"policy revision {revision} not realized within {timeout}s "
                           f"(realized: {result['revision']})")
        failed = result.get("failed_endpoints") or {}
        if failed:
            raise LabError(f"policy revision {revision} not realized on {len(failed)} endpoint(s) "
                           f"(they deny or keep their previous policy):\n"
                           + "\n".join(f"  {pod}: {why}" for pod, why in failed.items()))
        # Services follow the endpoints (their backends are the pods' addresses): asked only
        # now, their revision covers the endpoints realized above.
        services = client.get(f"/v1/services/wait?timeout={timeout}", timeout=timeout + 5)
        if not services["realized"]:
            raise LabError(f"services revision {services['revision']} not programmed within {timeout}s "
                           f"(programmed: {services['realized_revision']})")
        return {"revision": revision, "endpoints": len(client.endpoints())}

    def down(self) -> list[str]:
        """Removes everything the lab made; tolerates a half-made or half-removed lab."""
        removed = []
        info = json.loads(self.paths.info.read_text()) if self.paths.info.exists() else {}
        pid = info.get("agent_pid", 0)
        if stop_pid(pid):
            removed.append(f"agent (pid {pid})")
        stop_pid(info.get("world_pid", 0), timeout=None)
        LabListeners(self.run_paths.listeners).stop_all()
        for name in LabNode(self.name, info.get("index", 1)).owned_namespaces():
            netns.remove(name)
            removed.append(f"namespace {name}")
        pins = remove_pins(info.get("bpf_root", self.bpf_root), self.name)
        if pins:
            removed.append(f"pins {pins}")
        if os.path.isdir(self.cgroup):
            try:
                os.rmdir(self.cgroup)
                removed.append(f"cgroup {self.cgroup}")
            except OSError:
                pass  # a process still in it (an exec still running); it goes when that ends
        if self._unlink_default_hubble_socket():
            removed.append(f"link {DEFAULT_HUBBLE_SOCKET}")
        if self.paths.root.exists():
            shutil.rmtree(self.paths.root, ignore_errors=True)
            removed.append(f"lab directory {self.paths.root}")
        return removed

    # -- manifests ----------------------------------------------------------------------

    def apply(self, path: str | Path, timeout: float = 60.0) -> dict:
        self._info()
        for f in manifest_files(path):
            _object_keys(f)  # refuse files that are not YAML before changing anything
            tmp = self.paths.manifests / (f.name + ".tmp")
            shutil.copy(f, tmp)
            os.replace(tmp, self.paths.manifests / f.name)  # the agent never sees half a file
        return self.wait_realized(timeout)

    def delete(self, path: str | Path, timeout: float = 60.0) -> dict:
        """Removes the objects the files define, wherever they sit in the lab's manifests."""
        self._info()
        doomed = set()
        for f in manifest_files(path):
            doomed |= _object_keys(f)
        for f in manifest_files(self.paths.manifests) if any(self.paths.manifests.iterdir()) else []:
            docs = list(yaml.safe_load_all(f.read_text()))
            kept = [d for d in docs if not (isinstance(d, dict) and (
                str(d.get("kind")), str((d.get("metadata") or {}).get("namespace") or ""),
                str((d.get("metadata") or {}).get("name"))) in doomed)]
            if len(kept) == len(docs):
                continue
            if kept:
                tmp = f.with_suffix(f.suffix + ".tmp")
                tmp.write_text(yaml.safe_dump_all(kept))
                os.replace(tmp, f)
            else:
                f.unlink()
        return self.wait_realized(timeout)

    # -- exec / status ------------------------------------------------------------------

    def pod_netns(self, target: str) -> str:
        """The network namespace of pod NAMESPACE/POD (or POD of namespace default): as the
        agent reports it, or when no agent answers, by the name the agent gives it."""
        namespace, _, pod = target.partition("/")
        if not pod:
            namespace, pod = "default", namespace
        key = f"{namespace}/{pod}"
        info = self._info()
        try:
            endpoints = self.client(10).endpoints()
        except OSError:  # no agent (stopped, restarting): the pods keep their namespaces
            name = pod_netns(info["node_netns"], endpoint_name(key))
            if netns.exists(name):
                return name
        else:
            for ep in endpoints:
                if ep["pod"] == key:
                    return ep["netns"]
        raise LabError(f"no pod {key} in lab {self.name}")

    def exec(self, target: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        ns = self.pod_netns(target)
        cgroup_procs = os.path.join(self.cgroup, "cgroup.procs")

        def enter():
            # The lab's cgroup first (socket hooks attach there), then the pod's network.
            if os.path.exists(cgroup_procs):
                with open(cgroup_procs, "w") as f:
                    f.write(str(os.getpid()))
            from pyroute2 import netns as _netns

            _netns.setns(ns)

        return subprocess.run(argv, preexec_fn=enter, **kwargs)

    def exec_external(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Runs a command in the namespace outside the node (the world, 10.245.<i>.2 on
        the node's eth0): a client for NodePorts and LoadBalancer IPs."""
        ns = self._node().ext_netns
        if not netns.exists(ns):
            raise LabError(f"the outside namespace {ns} of lab {self.name} is missing")

        def enter():
            from pyroute2 import netns as _netns

            _netns.setns(ns)

        return subprocess.run(argv, preexec_fn=enter, **kwargs)

    def status(self) -> dict:
        info = self._info()
        running = alive(info["agent_pid"])
        out = {"name": self.name, "node_netns": info["node_netns"], "agent_pid": info["agent_pid"],
               "agent_running": running, "manifests": str(self.paths.manifests)}
        if running:
            client = self.client(10)
            out["endpoints"] = client.endpoints()
            out["policy"] = client.policy()
            agent_status = client.status()
            out["hubble_server"] = self.hubble_server
            out["metrics"] = agent_status.get("metrics", {})
        return out
