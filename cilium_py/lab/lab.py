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
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cilium_py import defaults
from cilium_py.agent.client import AgentClient
from cilium_py.datapath import netns
from cilium_py.lab.node import NS_PREFIX, LabNode

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
        return AgentClient(str(self.paths.run / self.name / "ciliumpy.sock"), timeout=timeout)

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
        try:
            node.create()
            os.makedirs(self.cgroup, exist_ok=True)
            info["world_pid"] = self._start_world(node)
            info["agent_pid"] = self._start_agent(node)
            self.paths.info.write_text(json.dumps(info))
            self._wait_ready(timeout)
            self._link_default_hubble_socket()
            return self.wait_realized(timeout)
        except BaseException:
            self.down()
            raise

    @property
    def hubble_socket(self) -> Path:
        return self.paths.run / "hubble.sock"

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

    @staticmethod
    def _start_world(node: LabNode) -> int:
        """A listener in the outside namespace, so policies about the world can be tried."""
        proc = netns.popen(node.ext_netns, [sys.executable, "-m", "cilium_py.lab.listener",
                                            "--name", "world", "--tcp", str(WORLD_PORT)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return proc.pid

    def world_ip(self) -> str:
        return str(self._node().addressing.world_ip)

    def node_ip(self) -> str:
        """The node's address on its uplink: where the outside reaches NodePorts."""
        return str(self._node().addressing.uplink_ip)

    def _start_agent(self, node: LabNode) -> int:
        a = node.addressing
        argv = [sys.executable, "-m", "cilium_py.cli.main", "agent", "--node", self.name,
                "--bpf-root", self.bpf_root, "--run-dir", str(self.paths.run),
                "--node-netns", node.netns, "--device", "eth0", "--node-ip", str(a.router_ip),
                "--node-ip", str(a.uplink_ip), "--manifests", str(self.paths.manifests),
                "--pod-cidr", str(a.pod_cidr), "--router-ip", str(a.router_ip),
                "--state-dir", str(self.paths.state), "--lab",
                # Socket LB on the lab's own cgroup, the one `lab exec` runs commands in.
                "--cgroup-root", self.cgroup,
                # Ephemeral ports: several labs may run at once; `lab status` shows the ports.
                "--prometheus-serve-addr", "127.0.0.1:0", "--hubble-metrics-server", "127.0.0.1:0",
                "--hubble-metrics", "drop,tcp,flow,icmp,port-distribution"]
        log = open(self.paths.root / "agent.log", "ab")
        # Its own session: the agent keeps running after `lab up` returns.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        return proc.pid

    def _agent_alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie still answers kill(0); its /proc status says so.
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    def _wait_ready(self, timeout: float) -> None:
        info = self._info()
        ready = self.paths.run / self.name / "agent.ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                return
            if not self._agent_alive(info["agent_pid"]):
                raise LabError(f"the lab agent exited; its log:\n{self.agent_log_tail()}")
            time.sleep(0.05)
        raise LabError(f"the lab agent was not ready within {timeout}s; its log:\n{self.agent_log_tail()}")

    def agent_log_tail(self, lines: int = 25) -> str:
        path = self.paths.root / "agent.log"
        if not path.exists():
            return ""
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])

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
        if pid and self._agent_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self._agent_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._agent_alive(pid):
                os.kill(pid, signal.SIGKILL)
            removed.append(f"agent (pid {pid})")
        if info.get("world_pid") and self._agent_alive(info["world_pid"]):
            os.kill(info["world_pid"], signal.SIGTERM)
        listeners = self.paths.state / "listeners"
        if listeners.is_dir():
            for pidfile in listeners.iterdir():
                try:
                    os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
                except (ValueError, ProcessLookupError, OSError):
                    pass
        node_ns = info.get("node_netns", f"{NS_PREFIX}{self.name}")
        for name in netns.list_names(node_ns):
            if name == node_ns or name.startswith(node_ns + "-"):
                netns.remove(name)
                removed.append(f"namespace {name}")
        bpf_root = info.get("bpf_root", self.bpf_root)
        pins = os.path.join(bpf_root, self.name)
        if os.path.isdir(pins):
            shutil.rmtree(pins, ignore_errors=True)
            removed.append(f"pins {pins}")
        try:
            os.rmdir(bpf_root)  # only when no other node's pins live there
        except OSError:
            pass
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
        namespace, _, pod = target.partition("/")
        if not pod:
            namespace, pod = "default", namespace
        info = self._info()
        name = f"{info['node_netns']}-pod-{namespace}-{pod}"
        if not netns.exists(name):
            raise LabError(f"no pod {namespace}/{pod} in lab {self.name}")
        return name

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
        alive = self._agent_alive(info["agent_pid"])
        out = {"name": self.name, "node_netns": info["node_netns"], "agent_pid": info["agent_pid"],
               "agent_running": alive, "manifests": str(self.paths.manifests)}
        if alive:
            client = self.client(10)
            out["endpoints"] = client.endpoints()
            out["policy"] = client.policy()
            agent_status = client.status()
            out["hubble_server"] = self.hubble_server
            out["metrics"] = agent_status.get("metrics", {})
        return out
