import ipaddress

import pytest

from cilium_py.agent.ipam import IPAM, IPAMExhausted


def test_lowest_free_address_and_stable_per_owner(tmp_path):
    ipam = IPAM("10.244.5.0/29", reserved=["10.244.5.1"], state_file=str(tmp_path / "ipam.json"))
    a = ipam.allocate("ns/a")
    assert a == ipaddress.IPv4Address("10.244.5.2")
    assert ipam.allocate("ns/a") == a
    b = ipam.allocate("ns/b")
    ipam.release("ns/a")
    assert ipam.allocate("ns/c") == a
    restarted = IPAM("10.244.5.0/29", reserved=["10.244.5.1"], state_file=str(tmp_path / "ipam.json"))
    assert restarted.allocate("ns/b") == b


def test_exhaustion_is_an_error():
    ipam = IPAM("10.244.5.0/30", reserved=["10.244.5.1"])
    ipam.allocate("x")
    with pytest.raises(IPAMExhausted, match="10.244.5.0/30"):
        ipam.allocate("y")
