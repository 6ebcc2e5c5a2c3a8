import math
import urllib.error
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cilium_py.agent.metrics import AgentMetrics, MapPressure, parse_address, serve
from cilium_py.datapath.maps.base import MapNotFound
from cilium_py.hubble.api.flow import flow_pb2 as fpb
from cilium_py.hubble.metrics import HANDLERS, HubbleMetrics, parse_enabled


def samples(registry) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label pairs): value}, without the client's *_created series."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def L(**labels) -> tuple:
    return tuple(sorted(labels.items()))


def family_names(registry) -> set[str]:
    return {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}


# ---- AgentMetrics: datapath counters through injected readers -------------------------------

MAP_COUNTERS = {
    (0, 1): (10, 1000),   # forwarded, ingress
    (0, 2): (5, 500),     # forwarded, egress
    (133, 1): (3, 180),   # POLICY_DENIED, ingress
    (181, 2): (1, 60),    # POLICY_DENY, egress
    (136, 2): (2, 120),   # in Hubble's enum, not in the datapath's reason table
}


def make_agent_metrics(**overrides) -> AgentMetrics:
    kwargs = dict(
        endpoint_count_fn=lambda: 4,
        lost_fn=lambda: {"hubble_ring_buffer": 3, "observer_events_queue": 1},
        metrics_reader=lambda: dict(MAP_COUNTERS),
        pressure_reader=lambda: {"ciliumpy_ct4_global": 0.25, "ciliumpy_policy": 0.5},
        events_lost_reader=lambda: 7,
    )
    kwargs.update(overrides)
    return AgentMetrics("/nonexistent/pin", **kwargs)


def test_datapath_counters_are_exported_with_cilium_names_and_labels():
    m = make_agent_metrics()
    got = samples(m.registry)
    assert got[("ciliumpy_endpoint_count", ())] == 4
    assert got[("ciliumpy_forward_count_total", L(direction="INGRESS"))] == 10
    assert got[("ciliumpy_forward_bytes_total", L(direction="INGRESS"))] == 1000
    assert got[("ciliumpy_forward_count_total", L(direction="EGRESS"))] == 5
    assert got[("ciliumpy_forward_bytes_total", L(direction="EGRESS"))] == 500
    assert got[("ciliumpy_drop_count_total", L(reason="POLICY_DENIED", direction="INGRESS"))] == 3
    assert got[("ciliumpy_drop_bytes_total", L(reason="POLICY_DENIED", direction="INGRESS"))] == 180
    assert got[("ciliumpy_drop_count_total", L(reason="POLICY_DENY", direction="EGRESS"))] == 1
    assert got[("ciliumpy_drop_count_total",
                L(reason="CT_MISSING_TCP_ACK_FLAG", direction="EGRESS"))] == 2
    assert got[("ciliumpy_bpf_map_pressure", L(map_name="ciliumpy_ct4_global"))] == 0.25
    assert got[("ciliumpy_bpf_map_pressure", L(map_name="ciliumpy_policy"))] == 0.5
    assert got[("ciliumpy_events_lost_total", L(source="datapath"))] == 7
    assert got[("ciliumpy_events_lost_total", L(source="hubble_ring_buffer"))] == 3
    assert got[("ciliumpy_events_lost_total", L(source="observer_events_queue"))] == 1
    # Forwarded packets never show up as a drop reason.
    assert not [k for k in got if k[0].startswith("ciliumpy_drop") and ("reason", "FORWARDED") in k[1]]

    text = generate_latest(m.registry).decode()
    assert "# TYPE ciliumpy_drop_count_total counter" in text
    assert "# TYPE ciliumpy_bpf_map_pressure gauge" in text


def test_readers_run_at_scrape_time():
    counters = {(0, 1): (1, 100)}
    m = make_agent_metrics(metrics_reader=lambda: dict(counters))
    assert samples(m.registry)[("ciliumpy_forward_count_total", L(direction="INGRESS"))] == 1
    counters[(0, 1)] = (9, 900)
    assert samples(m.registry)[("ciliumpy_forward_count_total", L(direction="INGRESS"))] == 9


def test_unreadable_map_drops_only_its_own_series():
    def missing():
        raise MapNotFound("/nonexistent/pin/ciliumpy_metrics is not pinned")

    m = make_agent_metrics(metrics_reader=missing, events_lost_reader=missing)
    got = samples(m.registry)
    assert not [k for k in got if k[0].startswith(("ciliumpy_drop", "ciliumpy_forward"))]
    assert ("ciliumpy_events_lost_total", L(source="datapath")) not in got
    assert got[("ciliumpy_events_lost_total", L(source="hubble_ring_buffer"))] == 3
    assert got[("ciliumpy_bpf_map_pressure", L(map_name="ciliumpy_ct4_global"))] == 0.25


def test_failing_lost_callback_does_not_fail_the_scrape():
    def broken():
        raise RuntimeError("boom")

    got = samples(make_agent_metrics(lost_fn=broken).registry)
    assert got[("ciliumpy_events_lost_total", L(source="datapath"))] == 7
    assert ("ciliumpy_events_lost_total", L(source="hubble_ring_buffer")) not in got


def test_failing_endpoint_callback_reports_nan_instead_of_failing_the_scrape():
    def broken():
        raise RuntimeError("no control plane")

    got = samples(make_agent_metrics(endpoint_count_fn=broken).registry)
    assert math.isnan(got[("ciliumpy_endpoint_count", ())])
    assert got[("ciliumpy_events_lost_total", L(source="datapath"))] == 7


def test_without_a_datapath_the_scrape_still_succeeds():
    # Default readers against a pin dir that holds no maps: only the agent-side series remain.
    m = AgentMetrics("/nonexistent/pin", lambda: 0)
    got = samples(m.registry)
    assert got == {("ciliumpy_endpoint_count", ()): 0}


def test_two_agents_in_one_process_do_not_collide():
    a, b = make_agent_metrics(endpoint_count_fn=lambda: 1), make_agent_metrics(endpoint_count_fn=lambda: 2)
    assert samples(a.registry)[("ciliumpy_endpoint_count", ())] == 1
    assert samples(b.registry)[("ciliumpy_endpoint_count", ())] == 2


def test_map_pressure_recounts_at_most_once_per_interval(monkeypatch):
    now = [100.0]
    pressure = MapPressure("/nonexistent/pin", interval=30.0, clock=lambda: now[0])
    counts = []

    def fake_count():
        counts.append(now[0])
        return {"ciliumpy_ct4_global": len(counts) / 10}

    monkeypatch.setattr(pressure, "_count", fake_count)
    assert pressure() == {"ciliumpy_ct4_global": 0.1}
    now[0] += 29.0
    assert pressure() == {"ciliumpy_ct4_global": 0.1}
    now[0] += 1.0
    assert pressure() == {"ciliumpy_ct4_global": 0.2}
    assert counts == [100.0, 130.0]


def test_map_pressure_skips_maps_that_are_not_pinned():
    assert MapPressure("/nonexistent/pin")() == {}


# ---- AgentMetrics.observe_flow: policy verdicts ----------------------------------------------

def verdict_flow(direction: int, match: int, verdict: int, event_type: int = 5) -> fpb.Flow:
    return fpb.Flow(verdict=verdict, traffic_direction=direction, policy_match_type=match,
                    event_type=fpb.CiliumEventType(type=event_type))


def test_observe_flow_counts_policy_verdicts_only():
    m = make_agent_metrics()
    for flow in [
        verdict_flow(fpb.INGRESS, 2, fpb.FORWARDED),
        verdict_flow(fpb.INGRESS, 2, fpb.FORWARDED),
        verdict_flow(fpb.EGRESS, 0, fpb.DROPPED),
        verdict_flow(fpb.INGRESS, 1, fpb.DROPPED),
        verdict_flow(fpb.EGRESS, 4, fpb.FORWARDED),
        verdict_flow(fpb.INGRESS, 3, fpb.AUDIT),
        verdict_flow(fpb.INGRESS, 2, fpb.FORWARDED, event_type=4),  # a trace: ignored
        verdict_flow(fpb.EGRESS, 0, fpb.DROPPED, event_type=1),     # a drop: ignored
    ]:
        m.observe_flow(flow)
    got = {k: v for k, v in samples(m.registry).items() if k[0] == "ciliumpy_policy_verdict_total"}
    assert got == {
        ("ciliumpy_policy_verdict_total", L(direction="ingress", match="l3-l4", action="allow")): 2,
        ("ciliumpy_policy_verdict_total", L(direction="egress", match="none", action="deny")): 1,
        ("ciliumpy_policy_verdict_total", L(direction="ingress", match="l3-only", action="deny")): 1,
        ("ciliumpy_policy_verdict_total", L(direction="egress", match="all", action="allow")): 1,
        ("ciliumpy_policy_verdict_total", L(direction="ingress", match="l4-only", action="audit")): 1,
    }


# ---- HubbleMetrics ---------------------------------------------------------------------------

def tcp_flow(verdict=fpb.FORWARDED, dport=80, reply: bool | None = False, **flags) -> fpb.Flow:
    flow = fpb.Flow(verdict=verdict, Type=fpb.L3_L4, IP=fpb.IP(ipVersion=fpb.IPv4),
                    l4=fpb.Layer4(TCP=fpb.TCP(source_port=40000, destination_port=dport,
                                              flags=fpb.TCPFlags(**flags))),
                    event_type=fpb.CiliumEventType(type=4, sub_type=0))
    if reply is not None:
        flow.is_reply.value = reply
    return flow


def udp_drop(reason=fpb.POLICY_DENIED) -> fpb.Flow:
    return fpb.Flow(verdict=fpb.DROPPED, Type=fpb.L3_L4, drop_reason=reason, drop_reason_desc=reason,
                    IP=fpb.IP(ipVersion=fpb.IPv4),
                    l4=fpb.Layer4(UDP=fpb.UDP(source_port=5000, destination_port=53)),
                    event_type=fpb.CiliumEventType(type=1, sub_type=reason))


def icmp_flow(icmp_type: int, v6: bool = False) -> fpb.Flow:
    l4 = fpb.Layer4(ICMPv6=fpb.ICMPv6(type=icmp_type)) if v6 else fpb.Layer4(ICMPv4=fpb.ICMPv4(type=icmp_type))
    return fpb.Flow(verdict=fpb.FORWARDED, Type=fpb.L3_L4,
                    IP=fpb.IP(ipVersion=fpb.IPv6 if v6 else fpb.IPv4), l4=l4,
                    event_type=fpb.CiliumEventType(type=4, sub_type=5))


def all_kinds_of_flows() -> list[fpb.Flow]:
    return [tcp_flow(SYN=True), tcp_flow(SYN=True, ACK=True, reply=True), udp_drop(),
            icmp_flow(8), icmp_flow(0), icmp_flow(129, v6=True)]


def hubble_samples(enabled) -> dict:
    m = HubbleMetrics(enabled)
    for flow in all_kinds_of_flows():
        m.process(flow)
    return samples(m.registry)


def test_drop_handler_counts_drops_by_reason_and_protocol():
    m = HubbleMetrics(["drop"])
    for flow in [udp_drop(), udp_drop(), udp_drop(fpb.CT_MAP_INSERTION_FAILED), tcp_flow(SYN=True)]:
        m.process(flow)
    no_l4 = fpb.Flow(verdict=fpb.DROPPED, drop_reason_desc=fpb.UNSUPPORTED_L3_PROTOCOL,
                     event_type=fpb.CiliumEventType(type=1))
    m.process(no_l4)
    # The DROPPED policy verdict that precedes a policy drop is not a second drop.
    verdict = udp_drop()
    verdict.event_type.type = 5
    m.process(verdict)
    assert samples(m.registry) == {
        ("hubble_drop_total", L(reason="POLICY_DENIED", protocol="UDP")): 2,
        ("hubble_drop_total", L(reason="CT_MAP_INSERTION_FAILED", protocol="UDP")): 1,
        ("hubble_drop_total", L(reason="UNSUPPORTED_L3_PROTOCOL", protocol="Unknown flow")): 1,
    }


def test_tcp_handler_counts_each_set_flag_of_forwarded_packets():
    m = HubbleMetrics(["tcp"])
    for flow in [tcp_flow(SYN=True), tcp_flow(SYN=True, ACK=True), tcp_flow(FIN=True, ACK=True),
                 tcp_flow(verdict=fpb.DROPPED, RST=True), udp_drop()]:
        m.process(flow)
    assert samples(m.registry) == {
        ("hubble_tcp_flags_total", L(flag="SYN", family="IPv4")): 2,
        ("hubble_tcp_flags_total", L(flag="ACK", family="IPv4")): 2,
        ("hubble_tcp_flags_total", L(flag="FIN", family="IPv4")): 1,
    }


def test_flow_handler_counts_every_flow_by_type_subtype_and_verdict():
    got = hubble_samples(["flow"])
    assert got == {
        ("hubble_flows_processed_total", L(type="L3_L4", subtype="to-endpoint", verdict="FORWARDED")): 2,
        ("hubble_flows_processed_total", L(type="L3_L4", subtype="", verdict="DROPPED")): 1,
        ("hubble_flows_processed_total", L(type="L3_L4", subtype="from-endpoint", verdict="FORWARDED")): 3,
    }


def test_flow_handler_leaves_subtype_empty_for_policy_verdicts():
    m = HubbleMetrics(["flow"])
    m.process(verdict_flow(fpb.INGRESS, 2, fpb.FORWARDED))
    assert samples(m.registry) == {
        ("hubble_flows_processed_total", L(type="UNKNOWN_TYPE", subtype="", verdict="FORWARDED")): 1}


def test_icmp_handler_names_types_per_family():
    m = HubbleMetrics(["icmp"])
    for flow in [icmp_flow(8), icmp_flow(8), icmp_flow(0), icmp_flow(3), icmp_flow(42),
                 icmp_flow(128, v6=True), tcp_flow(SYN=True)]:
        m.process(flow)
    assert samples(m.registry) == {
        ("hubble_icmp_total", L(family="IPv4", type="EchoRequest")): 2,
        ("hubble_icmp_total", L(family="IPv4", type="EchoReply")): 1,
        ("hubble_icmp_total", L(family="IPv4", type="DestinationUnreachable")): 1,
        ("hubble_icmp_total", L(family="IPv4", type="42")): 1,
        ("hubble_icmp_total", L(family="IPv6", type="EchoRequest")): 1,
    }


def test_port_distribution_counts_destination_ports_of_forwarded_requests():
    m = HubbleMetrics(["port-distribution"])
    udp = fpb.Flow(verdict=fpb.FORWARDED, l4=fpb.Layer4(UDP=fpb.UDP(destination_port=53)))
    udp.is_reply.value = False
    for flow in [tcp_flow(dport=80, SYN=True), tcp_flow(dport=80), tcp_flow(dport=443), udp,
                 tcp_flow(dport=40000, reply=True),        # a reply: the client's port
                 tcp_flow(dport=8080, reply=None),         # unknown direction
                 tcp_flow(dport=22, verdict=fpb.DROPPED),  # not forwarded
                 icmp_flow(8)]:
        m.process(flow)
    assert samples(m.registry) == {
        ("hubble_port_distribution_total", L(protocol="TCP", port="80")): 2,
        ("hubble_port_distribution_total", L(protocol="TCP", port="443")): 1,
        ("hubble_port_distribution_total", L(protocol="UDP", port="53")): 1,
    }


@pytest.mark.parametrize("name, prefix", [
    ("drop", "hubble_drop"), ("tcp", "hubble_tcp_flags"), ("flow", "hubble_flows_processed"),
    ("icmp", "hubble_icmp"), ("port-distribution", "hubble_port_distribution")])
def test_only_enabled_handlers_export(name, prefix):
    assert family_names(HubbleMetrics([name]).registry) == {prefix}
    got = hubble_samples([name])
    assert got and all(k[0].startswith(prefix) for k in got)


def test_nothing_enabled_exports_nothing():
    m = HubbleMetrics([])
    for flow in all_kinds_of_flows():
        m.process(flow)
    assert generate_latest(m.registry) == b""


def test_all_handlers_together_match_each_alone():
    together = hubble_samples(list(HANDLERS))
    alone = {}
    for name in HANDLERS:
        alone.update(hubble_samples([name]))
    assert together == alone


def test_parse_enabled_accepts_strings_and_lists():
    assert parse_enabled("drop,tcp,flow") == ["drop", "tcp", "flow"]
    assert parse_enabled(" drop, tcp  icmp ,") == ["drop", "tcp", "icmp"]
    assert parse_enabled(["port-distribution", "drop", "drop"]) == ["port-distribution", "drop"]
    assert parse_enabled("") == []
    assert HubbleMetrics("drop,icmp").enabled == ["drop", "icmp"]


def test_unknown_metric_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown hubble metric 'http'.*drop, tcp, flow, icmp, port-distribution"):
        HubbleMetrics(["drop", "http"])
    with pytest.raises(ValueError, match="options"):
        parse_enabled("drop:sourceContext=pod")


# ---- serve() ---------------------------------------------------------------------------------

def scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_serve_on_ephemeral_port_then_stop():
    m = make_agent_metrics()
    server = serve("127.0.0.1:0", m.registry)
    try:
        assert server.port > 0
        body = scrape(server.port)
        assert 'ciliumpy_drop_count_total{direction="INGRESS",reason="POLICY_DENIED"} 3.0' in body
        assert "ciliumpy_endpoint_count 4.0" in body
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(server.port)
    server.stop()  # idempotent


def test_serve_ipv6_loopback():
    m = make_agent_metrics()
    try:
        server = serve("[::1]:0", m.registry)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    try:
        assert "ciliumpy_endpoint_count 4.0" in scrape(server.port, "[::1]")
    finally:
        server.stop()


def test_serve_all_interfaces():
    m = make_agent_metrics()
    server = serve(":0", m.registry)
    try:
        assert server.host in ("::", "0.0.0.0")
        # "::" is dual-stack unless the host forces v6-only sockets.
        host = "[::1]" if server.host == "::" and _v6only() else "127.0.0.1"
        assert "ciliumpy_endpoint_count 4.0" in scrape(server.port, host)
    finally:
        server.stop()


def _v6only() -> bool:
    try:
        with open("/proc/sys/net/ipv6/bindv6only") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


@pytest.mark.parametrize("address, expected", [
    (":9962", ("", 9962)),
    ("127.0.0.1:9962", ("127.0.0.1", 9962)),
    ("[::1]:9962", ("::1", 9962)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_address(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", [
    "9962", "localhost", "", "::1:9962", "[::1:9962", "::1]:9962", "[nothost]:9962",
    "127.0.0.1:99999", ":abc", ":-1", "127.0.0.1:", ":٣",
])
def test_bad_address_is_a_value_error(address):
    with pytest.raises(ValueError, match="metrics address"):
        serve(address, make_agent_metrics().registry)


def test_port_in_use_names_the_address():
    m = make_agent_metrics()
    server = serve("127.0.0.1:0", m.registry)
    try:
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{server.port}"):
            serve(f"127.0.0.1:{server.port}", m.registry)
    finally:
        server.stop()


def test_module_does_not_touch_the_default_registry():
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    make_agent_metrics()
    HubbleMetrics(list(HANDLERS))
    assert set(REGISTRY._names_to_collectors) == before


def test_endpoint_states_count_not_ready_endpoints():
    got = samples(make_agent_metrics(endpoint_states_fn=lambda: {"ready": 3, "not-ready": 2}).registry)
    assert got[("ciliumpy_endpoint_state", L(endpoint_state="ready"))] == 3
    assert got[("ciliumpy_endpoint_state", L(endpoint_state="not-ready"))] == 2
    got = samples(make_agent_metrics(endpoint_states_fn=lambda: {"ready": 1}).registry)
    assert got[("ciliumpy_endpoint_state", L(endpoint_state="not-ready"))] == 0
