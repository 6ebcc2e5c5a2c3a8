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
