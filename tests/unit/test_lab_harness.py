"""The node harness's pieces that need no namespaces: the run-dir layout everyone shares,
the agent spawner's command line and failure report, the listener launcher, and the lab's
listener hooks (with a stand-in process instead of a listener in a pod)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from cilium_py.agent.client import api_socket
from cilium_py.agent.daemon import Agent, AgentConfig
from cilium_py.agent.hooks import EndpointHooks
from cilium_py.agent.paths import RunPaths, endpoint_name, pod_netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.lab.agentproc import AgentProcess, AgentProcessError
from cilium_py.lab.listeners import LabListeners, listener_argv
from cilium_py.lab.node import LabNode
from cilium_py.lab.process import alive, read_pid


def test_run_paths_layout(tmp_path):
    paths = RunPaths(str(tmp_path), "n1")
    assert paths.api_socket == str(tmp_path / "n1" / "ciliumpy.sock")
    assert paths.monitor_socket == str(tmp_path / "n1" / "monitor.sock")
    assert paths.ready_file == str(tmp_path / "n1" / "agent.ready")
    assert paths.listeners == str(tmp_path / "n1" / "listeners")
    assert paths.hubble_socket == str(tmp_path / "hubble.sock")


def test_agent_config_client_and_spawner_agree_on_the_layout(tmp_path):
    config = AgentConfig(datapath=DatapathConfig(node="n1"), run_dir=str(tmp_path))
    spawner = AgentProcess(node="n1", bpf_root="/sys/fs/bpf/x", run_dir=str(tmp_path), node_netns="cpy-n1")
    assert config.paths == RunPaths(str(tmp_path), "n1") == spawner.paths
    assert api_socket(str(tmp_path), "n1") == config.paths.api_socket
    assert spawner.ready_file == config.paths.ready_file


def test_pod_netns_names_follow_the_endpoint_name():
    assert endpoint_name("shop/backend") == "shop-backend"
    assert pod_netns("cpy-lab", endpoint_name("shop/backend")) == "cpy-lab-pod-shop-backend"


def test_lab_node_spawner_defaults():
    node = LabNode("x", 7)
    argv = AgentProcess.for_node(node, bpf_root="/sys/fs/bpf/t", run_dir="/tmp/r",
                                 extra_args=("--lab",)).argv
    assert argv[:3] == [sys.executable, "-m", "cilium_py.cli.main"]
    joined = " ".join(argv)
    assert "--node x " in joined and "--node-netns cpy-x " in joined and "--lab" in argv
    assert "--device eth0" in joined
    assert "--node-ip 10.244.7.1 --node-ip 10.245.7.1" in joined
    assert "--node-ip" not in AgentProcess.for_node(node, bpf_root="/b", run_dir="/r", node_ips=()).argv


def test_spawner_reports_an_agent_that_exits(tmp_path):
    agent = AgentProcess(node="gone", bpf_root=str(tmp_path / "bpf"), run_dir=str(tmp_path),
                         node_netns="cpy-no-such-namespace-here")
    with pytest.raises(AgentProcessError, match="does not exist"):
        agent.start(timeout=60)
    assert not agent.running()


def test_listener_argv_is_the_listener_module():
    assert listener_argv("web/a", tcp=(80, 8080), udp=(53,)) == [
        sys.executable, "-m", "cilium_py.lab.listener", "--name", "web/a",
        "--tcp", "80", "--tcp", "8080", "--udp", "53"]


def test_daemon_passes_listener_hooks_in_lab_mode_only(tmp_path):
    from cilium_py.cli.agent import _lab_listeners

    lab = Agent(AgentConfig(datapath=DatapathConfig(node="n1"), run_dir=str(tmp_path), lab=True,
                            endpoint_hooks=_lab_listeners))
    hooks = lab._endpoint_hooks()
    assert isinstance(hooks, LabListeners) and isinstance(hooks, EndpointHooks)
    assert str(hooks.pid_dir) == RunPaths(str(tmp_path), "n1").listeners
    plain = Agent(AgentConfig(datapath=DatapathConfig(node="n1"), run_dir=str(tmp_path)))
    assert plain._endpoint_hooks() is None


def test_control_plane_and_daemon_do_not_import_the_lab():
    code = ("import sys, cilium_py.agent.controller, cilium_py.agent.daemon; "
            "print([m for m in sys.modules if m.startswith('cilium_py.lab')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _Handle:
    netns = "cpy-x-pod-web-a"


@pytest.fixture
def launched():
    """A launcher that records its calls and starts a stand-in process per listener."""
    calls, procs = [], []

    def launch(ns, name, tcp, udp, *, detached):
        calls.append((ns, name, list(tcp), list(udp), detached))
        proc = subprocess.Popen(["sleep", "60"])
        procs.append(proc)
        return proc

    yield launch, calls, procs
    for proc in procs:
        proc.kill()
        proc.wait()


def test_lab_listeners_start_one_listener_per_pod(tmp_path, launched):
    launch, calls, procs = launched
    hooks = LabListeners(tmp_path / "listeners", launch=launch)
    hooks.endpoint_created("web/a", _Handle(), [(80, "TCP"), (53, "UDP"), (9, "SCTP")])
    assert calls == [("cpy-x-pod-web-a", "web/a", [80], [53], True)]
    assert read_pid(hooks.pidfile("web/a")) == procs[0].pid
    # An agent restarting finds the listener alive and leaves it serving.
    LabListeners(tmp_path / "listeners", launch=launch).endpoint_created("web/a", _Handle(), [(80, "TCP")])
    assert len(calls) == 1
    hooks.endpoint_removed("web/a")
    assert procs[0].wait(5) == -signal.SIGTERM
    assert not hooks.pidfile("web/a").exists()


def test_lab_listeners_skip_pods_without_tcp_or_udp_ports(tmp_path, launched):
    launch, calls, _ = launched
    hooks = LabListeners(tmp_path / "listeners", launch=launch)
    hooks.endpoint_created("web/b", _Handle(), [])
    hooks.endpoint_created("web/c", _Handle(), [(9, "SCTP")])
    hooks.endpoint_removed("web/b")  # nothing was started: nothing to stop
    assert calls == []


def test_lab_listeners_stop_all(tmp_path, launched):
    launch, _, procs = launched
    hooks = LabListeners(tmp_path / "listeners", launch=launch)
    for key in ("a/one", "a/two"):
        hooks.endpoint_created(key, _Handle(), [(80, "TCP")])
    assert hooks.stop_all() == 2
    assert [p.wait(5) for p in procs] == [-signal.SIGTERM] * 2
    assert list((tmp_path / "listeners").iterdir()) == []
    assert not alive(procs[0].pid)
