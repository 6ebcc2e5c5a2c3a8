import subprocess
from pathlib import Path

import pytest

from cilium_py.agent.daemon import Agent, AgentConfig, AgentError
from cilium_py.datapath.loader import build_source

ROOT = Path(__file__).resolve().parents[2]


def test_no_code_uses_the_uplink_network():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    forbidden = "192.0" + ".2."
    offenders = [f for f in files if not f.endswith(".md") and (ROOT / f).is_file()
                 and forbidden in (ROOT / f).read_text(errors="ignore")]
    assert offenders == []


def test_agent_refuses_to_run_without_a_node_namespace():
    with pytest.raises(AgentError, match="node namespace"):
        Agent(AgentConfig(node_netns="")).start()
    with pytest.raises(AgentError, match="does not exist"):
        Agent(AgentConfig(node_netns="cpy-no-such-namespace-x")).start()


def test_translation_unit_expands_each_header_once():
    src = build_source()
    assert src.count("struct ipv4_ct_tuple {") == 1
    assert src.count("int cil_from_container(") == 1 and src.count("int cil_xdp_entry(") == 1
    assert '#include "lib/' not in src
    assert '#line 1 "' in src and "bpf/lib/conntrack.h" in src
