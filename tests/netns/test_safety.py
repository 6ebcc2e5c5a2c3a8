"""DESIGN.md §6: nothing of ours attaches to the root namespace's devices."""

import pytest
from pyroute2 import IPRoute

from cilium_py.datapath import attach

pytestmark = pytest.mark.netns


def test_root_namespace_devices_carry_no_programs_of_ours(lab):
    # The lab fixture has an agent running with XDP and endpoints attached right now.
    with IPRoute() as ipr:
        for link in ipr.get_links():
            index, name = link["index"], link.get_attr("IFLA_IFNAME")
            for direction in (attach.INGRESS, attach.EGRESS):
                try:
                    names = attach.tc_program_names(ipr, index, direction)
                except Exception:  # noqa: BLE001 - no clsact on this device
                    names = []
                assert not [n for n in names if n.startswith("cil_")], f"{name} carries {names}"
            assert attach.xdp_program_id(ipr, index) == 0, f"{name} has an XDP program"


def test_agent_refuses_the_root_namespace_under_another_name(privileged, unique, tmp_path):
    """A bind mount of the root namespace in /var/run/netns passes an existence check; the
    agent must still see through it and refuse before loading anything."""
    import os
    import subprocess
    import sys

    from cilium_py.datapath import netns

    name = f"cpy-test-{unique}-rootalias"
    alias = netns.path(name)
    os.makedirs(netns.NETNS_DIR, exist_ok=True)
    open(alias, "w").close()
    try:
        subprocess.run(["mount", "--bind", "/proc/self/ns/net", alias], check=True)
        assert netns.is_root(name)
        out = subprocess.run([sys.executable, "-m", "cilium_py.cli.main", "agent", "--node",
                              f"t{unique}", "--bpf-root", f"/sys/fs/bpf/ciliumpy-test-{unique}-root",
                              "--run-dir", str(tmp_path), "--node-netns", name],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "root network namespace" in out.stderr
        assert not os.path.exists(f"/sys/fs/bpf/ciliumpy-test-{unique}-root")
    finally:
        subprocess.run(["umount", alias], check=False)
        os.unlink(alias)
