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
