"""The kube-proxy-replacement options: what they compile into, and how bad values are refused
before anything is loaded."""

import pytest
from click.testing import CliRunner

from cilium_py.cli.main import cli
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.nat import NatMapping


def test_defaults_reject_and_tc_only():
    flags = DatapathConfig().cflags()
    assert "-DSERVICE_NO_BACKEND_DROP=0" in flags
    assert "-DENABLE_NODEPORT_ACCELERATION=0" in flags


def test_drop_and_native_acceleration_compile_in():
    flags = DatapathConfig(service_no_backend_response="drop", lb_acceleration="native").cflags()
    assert "-DSERVICE_NO_BACKEND_DROP=1" in flags
    assert "-DENABLE_NODEPORT_ACCELERATION=1" in flags


@pytest.mark.parametrize("field,value", [("service_no_backend_response", "ignore"),
                                         ("lb_acceleration", "best-effort")])
def test_unknown_values_are_refused(field, value):
    with pytest.raises(ValueError, match=value):
        DatapathConfig(**{field: value})


@pytest.mark.parametrize("flag,value", [("--service-no-backend-response", "ignore"),
                                        ("--bpf-lb-acceleration", "best-effort")])
def test_agent_flags_are_checked(flag, value):
    result = CliRunner().invoke(cli, ["agent", "--node-netns", "cpy-none", flag, value])
    assert result.exit_code == 2 and flag in result.output


def test_bpf_nat_list_explains_missing_pins(tmp_path):
    result = CliRunner().invoke(cli, ["bpf", "nat", "list", "--bpf-root", str(tmp_path), "--node", "n1"])
    assert result.exit_code == 1 and "is not pinned" in result.output


def test_nat_mapping_line_and_dict():
    import ipaddress

    a = ipaddress.IPv4Address
    m = NatMapping(protocol=6, direction="OUT", saddr=a("10.245.1.2"), sport=40000,
                   daddr=a("10.245.1.1"), dport=30080, to_saddr=a("10.245.1.1"), to_sport=41000,
                   to_daddr=a("10.246.1.2"), to_dport=80, flags=3, backend_id=7, service_id=2,
                   created=100, age=5)
    assert m.line() == ("TCP OUT 10.245.1.2:40000 -> 10.245.1.1:30080 XLATE 10.245.1.1:41000 -> "
                        "10.246.1.2:80 Created=5sec ago Flags=[ Service SNAT ] RevNAT=2 BackendID=7")
    d = m.to_dict()
    assert (d["translated_source"], d["flags"], d["service_id"]) == ("10.245.1.1:41000",
                                                                     ["Service", "SNAT"], 2)
