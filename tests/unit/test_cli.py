import json

from click.testing import CliRunner

from cilium_py.cli.main import cli
from cilium_py.cli.options import emit
from cilium_py.datapath.config import DatapathConfig


def test_bpf_commands_explain_missing_pins(tmp_path):
    result = CliRunner().invoke(cli, ["bpf", "ct", "list", "global", "--bpf-root", str(tmp_path), "--node", "n1"])
    assert result.exit_code == 1
    assert "is not pinned" in result.output and "agent" in result.output


def test_ct_scope_must_be_global(tmp_path):
    result = CliRunner().invoke(cli, ["bpf", "ct", "list", "endpoint", "--bpf-root", str(tmp_path)])
    assert result.exit_code == 2 and "global" in result.output


def test_prefilter_rejects_bad_cidr_before_touching_maps(tmp_path):
    result = CliRunner().invoke(cli, ["bpf", "prefilter", "update", "10.0.0.1/8", "--bpf-root", str(tmp_path)])
    assert result.exit_code == 2 and "host bits" in result.output


def test_monitor_without_agent(tmp_path):
    result = CliRunner().invoke(cli, ["monitor", "--run-dir", str(tmp_path), "--node", "x"])
    assert result.exit_code == 1 and "no agent is serving events for node x" in result.output


def test_agent_requires_node_namespace():
    result = CliRunner().invoke(cli, ["agent", "--node", "x"])
    assert result.exit_code == 2 and "--node-netns" in result.output


def test_emit_table_and_json(capsys):
    rows = [{"a": "x", "b": 1}, {"a": "longer", "b": 22}]
    emit("table", rows, [("A", "a"), ("B", lambda r: r["b"] * 2)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["A", "B"] and out[2].split() == ["longer", "44"]
    emit("json", rows, [])
    assert json.loads(capsys.readouterr().out) == rows


def test_config_validates_names():
    import pytest

    with pytest.raises(ValueError, match="events"):
        DatapathConfig(events="kafka")
    with pytest.raises(ValueError, match="node name"):
        DatapathConfig(node="a/b")
    cflags = DatapathConfig(node="n", bpf_root="/sys/fs/bpf/x", events="perf").cflags()
    assert '-DPIN_ROOT="/sys/fs/bpf/x/n"' in cflags and "-DEVENTS_PERF" in cflags


def test_agent_options_from_config_file_env_and_flags(tmp_path, monkeypatch):
    from cilium_py.cli import agent as agent_cli

    seen = {}

    class FakeAgent:
        def __init__(self, config):
            seen["config"] = config

        def run_forever(self):
            pass

    monkeypatch.setattr(agent_cli, "Agent", FakeAgent)
    config = tmp_path / "agent.yaml"
    config.write_text("node-netns: cpy-from-file\nbpf-ct-global-tcp-max: 2048\nevents: perf\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["agent", "--config", str(config), "--events", "ringbuf"],
                           env={"CILIUMPY_AGENT_BPF_CT_GLOBAL_ANY_MAX": "4096"})
    assert result.exit_code == 0, result.output
    cfg = seen["config"]
    assert cfg.node_netns == "cpy-from-file"
    assert cfg.datapath.ct_global_tcp_max == 2048      # from the file
    assert cfg.datapath.ct_global_any_max == 4096      # from the environment
    assert cfg.datapath.events == "ringbuf"            # the flag beats the file


def test_agent_config_file_with_unknown_option(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("node-netns: x\nbpf-ct-global-max: 1\n")
    result = CliRunner().invoke(cli, ["agent", "--config", str(config)])
    assert result.exit_code == 2 and "unknown option(s): bpf-ct-global-max" in result.output


def test_policy_wait_and_status_name_endpoints_that_failed(monkeypatch):
    """Realized for the node but not for two endpoints: `policy wait` fails and names them,
    `status` counts them next to the revision."""
    from cilium_py.cli import agentapi

    failed = {"x/a": "policy not realized, denying all traffic: policy map full"}
    answers = {
        "wait_revision": {"realized": True, "revision": 7, "failed_endpoints": failed},
        "status": {"node": "n1", "controllers": {"endpoint-x/a": {"failures": 3, "last_error": "map full"}},
                   "datapath": {"bpf_root": "/b", "events": "ringbuf", "events_received": 0, "events_lost": 0},
                   "store": {"source": "s", "objects": 1, "errors": []}, "endpoints": 1, "identities": 1,
                   "policy": {"revision": 7, "realized": 7, "failed_endpoints": failed},
                   "map_pressure": {"ciliumpy_policy": 0.99}, "hubble": {}, "metrics": {}},
    }
    monkeypatch.setattr(agentapi, "call", lambda node, run_dir, method, *args: answers[method])
    result = CliRunner().invoke(cli, ["policy", "wait", "7"])
    assert result.exit_code == 1
    assert "not realized on 1 endpoint" in result.output and "x/a: policy not realized" in result.output
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    assert "0/1 healthy" in result.output and "(realized 7, 1 endpoints not realized)" in result.output
    assert "ciliumpy_policy 99.0%" in result.output
