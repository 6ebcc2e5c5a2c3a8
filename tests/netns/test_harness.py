"""running_node() leaves nothing behind: not when the agent fails to start, not when the
`with` body fails after endpoints and listeners exist."""

from __future__ import annotations

import os

import pytest

from cilium_py.datapath import netns
from cilium_py.lab.agentproc import AgentProcessError
from cilium_py.lab.harness import PodSpec, remove_pins, running_node
from cilium_py.lab.node import LabNode
from cilium_py.lab.process import alive

pytestmark = [pytest.mark.netns]


@pytest.fixture
def node(privileged, unique):
    return LabNode(f"h{unique}", index=233)


@pytest.fixture
def bpf_root(unique):
    return f"/sys/fs/bpf/ciliumpy-test-{unique}-harness"


def test_agent_that_fails_to_start_leaves_nothing(node, bpf_root, tmp_path):
    with pytest.raises(AgentProcessError, match="no-such-option"):
        with running_node(node, bpf_root=bpf_root, run_dir=str(tmp_path),
                          agent_args=("--no-such-option",)):
            pass
    assert node.owned_namespaces() == []
    assert not os.path.exists(bpf_root)


def test_failure_in_the_body_removes_agent_endpoints_and_listeners(node, bpf_root, tmp_path):
    with pytest.raises(RuntimeError, match="the test failed here"):
        with running_node(node, bpf_root=bpf_root, run_dir=str(tmp_path),
                          pods={"a": PodSpec(1000, tcp=(80,)), "b": PodSpec(1001)}) as running:
            pod_ns = running.pods["a"].netns
            assert netns.exists(pod_ns) and running.pods["b"].ip == node.addressing.pod_ip(2)
            assert running.client().status()["node"] == node.name
            agent_pid = running.agent.pid
            (listener,) = running.listeners
            raise RuntimeError("the test failed here")
    assert listener.poll() is not None
    assert not alive(agent_pid)
    assert not netns.exists(pod_ns) and node.owned_namespaces() == []
    assert not os.path.exists(os.path.join(bpf_root, node.name))
    assert not os.path.exists(running.paths.ready_file)


def test_keep_leaves_the_node_running(node, bpf_root, tmp_path):
    with running_node(node, bpf_root=bpf_root, run_dir=str(tmp_path)) as running:
        agent = running.agent
        running.keep()
    try:
        assert agent.running() and netns.exists(node.netns)
        assert os.path.isdir(os.path.join(bpf_root, node.name))
    finally:
        agent.stop()
        for name in node.owned_namespaces():
            netns.remove(name)
        remove_pins(bpf_root, node.name)
