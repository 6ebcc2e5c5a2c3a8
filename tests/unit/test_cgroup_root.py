"""--cgroup-root: the socket-LB hooks go on a cgroup v2 directory, never on the root of a
cgroup v2 mount (the machine's root cgroup). Checked against a crafted mountinfo."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cilium_py.cli.agent import agent
from cilium_py.datapath.attach import CgroupError, cgroup2_mounts, check_cgroup_root


@pytest.fixture
def tree(tmp_path):
    """tmp/cg is a cgroup2 mount (with children), tmp/v1 a cgroup v1 mount, tmp/plain no
    mount at all, and "tmp/with space" a cgroup2 mount whose name mountinfo escapes."""
    for d in ("cg/pods/inner", "v1/pods", "plain", "with space/child"):
        (tmp_path / d).mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    escaped = str(tmp_path).replace(" ", "\\040") + "/with\\040space"
    mountinfo.write_text(
        "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        f"30 22 0:26 / {tmp_path}/cg rw,nosuid shared:9 - cgroup2 cgroup2 rw\n"
        f"31 22 0:27 / {tmp_path}/v1 rw,nosuid shared:10 - cgroup cgroup rw,memory\n"
        f"32 22 0:28 / {escaped} rw shared:11 - "
        "cgroup2 cgroup2 rw\n")
    return tmp_path, str(mountinfo)


def test_child_cgroups_are_accepted(tree):
    root, info = tree
    assert check_cgroup_root(str(root / "cg/pods"), info) == str(root / "cg/pods")
    assert check_cgroup_root(str(root / "cg/pods/inner/"), info) == str(root / "cg/pods/inner")
    assert check_cgroup_root(str(root / "with space/child"), info) == str(root / "with space/child")


@pytest.mark.parametrize("path", ["cg", "cg/", "cg/pods/..", "with space"])
def test_the_root_of_a_cgroup2_mount_is_refused(tree, path):
    root, info = tree
    with pytest.raises(CgroupError, match="root of the cgroup v2 mount"):
        check_cgroup_root(str(root / path), info)


@pytest.mark.parametrize("path,message", [("v1/pods", "not in a cgroup v2 hierarchy"),
                                          ("plain", "not in a cgroup v2 hierarchy"),
                                          ("cg/missing", "does not exist")])
def test_other_paths_are_refused(tree, path, message):
    root, info = tree
    with pytest.raises(CgroupError, match=message):
        check_cgroup_root(str(root / path), info)


def test_mountinfo_paths_are_unescaped(tree):
    root, info = tree
    assert cgroup2_mounts(info)[f"{root}/with space"] == "cgroup2"


def test_agent_flags_refuse_before_loading_anything(tree):
    root, _ = tree
    runner = CliRunner()
    result = runner.invoke(agent, ["--node-netns", "cpy-none", "--bpf-lb-sock"])
    assert result.exit_code == 2 and "needs --cgroup-root" in result.output
    result = runner.invoke(agent, ["--node-netns", "cpy-none", "--cgroup-root", str(root / "plain")])
    assert result.exit_code == 2 and "cgroup v2" in result.output


def test_a_cgroup_holding_init_or_the_agent_is_refused(tree, monkeypatch):
    """system.slice, user.slice and the like: the host's own sockets would be translated."""
    from cilium_py.datapath import attach

    root, info = tree
    monkeypatch.setattr(attach, "_cgroup2_path_of",
                        lambda pid, mount: f"{mount}/pods/inner" if pid == 1 else None)
    with pytest.raises(CgroupError, match=r"contains init \(PID 1\)"):
        check_cgroup_root(str(root / "cg/pods"), info)
    assert check_cgroup_root(str(root / "with space/child"), info)
