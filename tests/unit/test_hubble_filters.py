"""FlowFilter semantics: fields ANDed, values ORed, whitelist minus blacklist, and clear
errors for filters the server cannot honour."""

from __future__ import annotations

import pytest
from google.protobuf import wrappers_pb2

from cilium_py.hubble.api.flow import flow_pb2 as F
from cilium_py.hubble.filters import FilterError, compile_filter, compile_filters


def flow(*, src_pod="web-1", src_ns="shop", dst_pod="db-1", dst_ns="shop", src_ip="10.244.1.10",
         dst_ip="10.244.1.20", proto="TCP", sport=40000, dport=80, verdict=F.FORWARDED,
         reply=None, kind=4, sub_type=5, direction=F.EGRESS, drop_reason=0, src_id=300,
         dst_id=301, node="lab-node", syn=True) -> F.Flow:
    f = F.Flow(verdict=verdict, node_name=node, traffic_direction=direction,
               drop_reason_desc=drop_reason, uuid="u-1")
    f.IP.source, f.IP.destination, f.IP.ipVersion = src_ip, dst_ip, F.IPv4
    f.source.CopyFrom(F.Endpoint(pod_name=src_pod, namespace=src_ns, identity=src_id,
                                 labels=["k8s:app=web", "k8s:tier=front"]))
    f.destination.CopyFrom(F.Endpoint(pod_name=dst_pod, namespace=dst_ns, identity=dst_id,
                                      labels=["k8s:app=db"]))
    if proto == "TCP":
        f.l4.TCP.source_port, f.l4.TCP.destination_port = sport, dport
        f.l4.TCP.flags.SYN = syn
    elif proto == "UDP":
        f.l4.UDP.source_port, f.l4.UDP.destination_port = sport, dport
    elif proto == "ICMPv4":
        f.l4.ICMPv4.type = 8
    if reply is not None:
        f.is_reply.CopyFrom(wrappers_pb2.BoolValue(value=reply))
    f.event_type.type, f.event_type.sub_type = kind, sub_type
    return f


CASES = [
    # (filter, matching flow kwargs, non-matching flow kwargs)
    (F.FlowFilter(source_pod=["shop/web"]), {}, {"src_pod": "api-1"}),
    (F.FlowFilter(source_pod=["shop/"]), {}, {"src_ns": "other"}),
    (F.FlowFilter(destination_pod=["db"]), {"dst_ns": "default"}, {}),
    (F.FlowFilter(source_ip=["10.244.1.0/24"]), {}, {"src_ip": "10.244.2.1"}),
    (F.FlowFilter(destination_ip=["10.244.1.20", "10.9.9.9"]), {}, {"dst_ip": "10.244.1.21"}),
    (F.FlowFilter(verdict=[F.DROPPED]), {"verdict": F.DROPPED}, {}),
    (F.FlowFilter(event_type=[F.EventTypeFilter(type=4)]), {}, {"kind": 1}),
    (F.FlowFilter(event_type=[F.EventTypeFilter(type=4, match_sub_type=True, sub_type=0)]),
     {"sub_type": 0}, {"sub_type": 5}),
    (F.FlowFilter(source_label=["app=web"]), {}, None),
    (F.FlowFilter(source_label=["k8s:app in (web, api),tier"]), {}, None),
    (F.FlowFilter(destination_label=["!app"]), None, {}),
    (F.FlowFilter(protocol=["udp"]), {"proto": "UDP"}, {}),
    (F.FlowFilter(protocol=["ICMP"]), {"proto": "ICMPv4"}, {}),
    (F.FlowFilter(destination_port=["80"]), {}, {"dport": 443}),
    (F.FlowFilter(source_port=["40000"]), {}, {"sport": 1}),
    (F.FlowFilter(reply=[True]), {"reply": True}, {"reply": False}),
    (F.FlowFilter(reply=[False]), {"reply": False}, {}),  # unknown is neither
    (F.FlowFilter(source_identity=[300]), {}, {"src_id": 5}),
    (F.FlowFilter(destination_identity=[301, 2]), {}, {"dst_id": 5}),
    (F.FlowFilter(traffic_direction=[F.INGRESS]), {"direction": F.INGRESS}, {}),
    (F.FlowFilter(drop_reason_desc=[F.POLICY_DENIED]), {"drop_reason": 133}, {"drop_reason": 181}),
    (F.FlowFilter(node_name=["lab-*"]), {}, {"node": "other"}),
    (F.FlowFilter(tcp_flags=[F.TCPFlags(SYN=True)]), {}, {"syn": False}),
    (F.FlowFilter(uuid=["u-1"]), {}, None),
    # Fields of one filter are ANDed.
    (F.FlowFilter(source_pod=["shop/web"], destination_port=["80"]), {}, {"dport": 81}),
]


@pytest.mark.parametrize("flt,yes,no", CASES)
def test_filter_fields(flt, yes, no):
    check = compile_filter(flt)
    if yes is not None:
        assert check(flow(**yes)), f"{flt} should match {yes}"
    if no is not None:
        assert not check(flow(**no)), f"{flt} should not match {no}"


def test_whitelist_is_ored_and_blacklist_removes():
    both = compile_filters([F.FlowFilter(source_pod=["shop/web"]),
                            F.FlowFilter(destination_pod=["shop/web"])], [])
    assert both(flow()) and both(flow(src_pod="db-1", dst_pod="web-1"))
    assert not both(flow(src_pod="a", dst_pod="b"))
    not_dropped = compile_filters([], [F.FlowFilter(verdict=[F.DROPPED])])
    assert not_dropped(flow()) and not not_dropped(flow(verdict=F.DROPPED))
    web_not_80 = compile_filters([F.FlowFilter(source_pod=["shop/web"])],
                                 [F.FlowFilter(destination_port=["80"])])
    assert web_not_80(flow(dport=81)) and not web_not_80(flow(dport=80))
    assert compile_filters([], [])(flow())


@pytest.mark.parametrize("flt,message", [
    (F.FlowFilter(source_ip=["10.0.0.300"]), "source_ip: '10.0.0.300' is not an IP"),
    (F.FlowFilter(destination_port=["http"]), "destination_port: 'http' is not a port"),
    (F.FlowFilter(source_port=["70000"]), "out of range"),
    (F.FlowFilter(protocol=["gre"]), "unknown protocol 'gre'"),
    (F.FlowFilter(source_label=["app=(web"]), "cannot parse label selector"),
    (F.FlowFilter(source_pod=["/web"]), "empty namespace"),
])
def test_invalid_filters_name_the_field(flt, message):
    with pytest.raises(FilterError, match=message.replace("(", r"\(")):
        compile_filter(flt)


def test_a_filter_field_this_server_does_not_know_is_refused():
    # Field 7 (source_fqdn) upstream: a client sending it must not get every flow back.
    raw = F.FlowFilter(source_pod=["shop/"]).SerializeToString() + b"\x3a\x0bexample.com"
    flt = F.FlowFilter.FromString(raw)
    with pytest.raises(FilterError, match="field.* 7 .*not supported"):
        compile_filter(flt)
