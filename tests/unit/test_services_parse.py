"""Service, EndpointSlice and hostPort parsing (the objects' parsers) and what of them this
node serves (services.parse): what is served, and errors that name the object and the
field."""

from __future__ import annotations

import pytest

from cilium_py.agent.errors import InvalidObject, ValidationError
from cilium_py.agent.objects import parse_endpoint_slice, parse_pod
from cilium_py.agent.objects import parse_service as parse_service_object
from cilium_py.agent.objects.service import DEFAULT_AFFINITY_TIMEOUT
from cilium_py.agent.services.config import ServiceConfig, parse_node_port_range
from cilium_py.agent.services.parse import ServiceValidationError, check_service, host_ports, slice_warnings
from cilium_py.agent.sources.manifests import parse_documents
from cilium_py.datapath.maps.lb import ALGORITHM_DEFAULT, ALGORITHM_MAGLEV, ALGORITHM_RANDOM

CONFIG = ServiceConfig(node="n1", node_ips=("10.245.1.1",))


def svc(spec: dict, name="web", ns="shop", annotations=None, status=None) -> dict:
    body = {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, **({"annotations": annotations} if annotations else {})},
            "spec": spec}
    if status is not None:
        body["status"] = status
    return body


def parse_service(doc: dict, config: ServiceConfig):
    """What the service manager gets to serve: the parsed object, checked against the node."""
    service = parse_service_object(doc, "svc.yaml")
    return service, check_service(service, config)


def errors_of(doc: dict, config: ServiceConfig = CONFIG) -> list[ValidationError]:
    """The errors of the first stage that rejects the Service: the parser or the node."""
    with pytest.raises(InvalidObject) as e:
        parse_service(doc, config)
    return e.value.errors


def one_error(doc: dict) -> ValidationError:
    errs = errors_of(doc)
    assert len(errs) == 1, errs
    return errs[0]


# -- Services ------------------------------------------------------------------------------

def test_cluster_ip_with_several_ports_and_defaults():
    spec, warnings = parse_service(svc({"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [
        {"name": "http", "port": 80, "targetPort": "http"},
        {"name": "dns", "port": 53, "protocol": "UDP"}]}), CONFIG)
    assert warnings == []
    assert (spec.type, spec.cluster_ip, spec.headless, spec.selector) == ("ClusterIP", "10.96.0.10", False, (("app", "web"),))
    http, dns = spec.ports
    assert (http.name, http.port, http.protocol, http.target_port, http.node_port) == ("http", 80, 6, "http", 0)
    assert (dns.port, dns.protocol, dns.target_port) == (53, 17, 53)  # targetPort defaults to port
    assert (spec.affinity_timeout, spec.etp_local, spec.itp_local, spec.algorithm) == (0, False, False, ALGORITHM_DEFAULT)


def test_node_port_load_balancer_external_ips():
    spec, _ = parse_service(svc(
        {"type": "LoadBalancer", "clusterIP": "10.96.0.11", "loadBalancerIP": "172.16.0.9",
         "externalIPs": ["172.16.1.1", "fd00::1"], "externalTrafficPolicy": "Local",
         "internalTrafficPolicy": "Local", "ports": [{"port": 443, "nodePort": 30443}]},
        status={"loadBalancer": {"ingress": [{"ip": "172.16.0.10"}, {"hostname": "lb.example"}]}}), CONFIG)
    assert spec.has_node_ports and spec.ports[0].node_port == 30443
    assert spec.lb_ips == ("172.16.0.9", "172.16.0.10")
    assert spec.external_ips == ("172.16.1.1",)  # IPv6 is accepted and not served
    assert spec.etp_local and spec.itp_local


def test_session_affinity_default_and_explicit_timeout():
    spec, _ = parse_service(svc({"clusterIP": "10.96.0.12", "sessionAffinity": "ClientIP",
                                 "ports": [{"port": 80}]}), CONFIG)
    assert spec.affinity_timeout == DEFAULT_AFFINITY_TIMEOUT == 10800
    spec, _ = parse_service(svc({"clusterIP": "10.96.0.12", "sessionAffinity": "ClientIP",
                                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                                 "ports": [{"port": 80}]}), CONFIG)
    assert spec.affinity_timeout == 60
    err = one_error(svc({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}},
                         "ports": [{"port": 80}]}))
    assert err.field == "spec.sessionAffinityConfig.clientIP.timeoutSeconds"


@pytest.mark.parametrize("value,algorithm", [("maglev", ALGORITHM_MAGLEV), ("random", ALGORITHM_RANDOM)])
def test_lb_algorithm_annotation(value, algorithm):
    spec, _ = parse_service(svc({"ports": [{"port": 80}]}, annotations={"service.cilium.io/lb-algorithm": value}), CONFIG)
    assert spec.algorithm == algorithm


def test_headless_and_external_name_are_not_load_balanced():
    headless, _ = parse_service(svc({"clusterIP": "None", "selector": {"a": "b"}}), CONFIG)
    assert headless.headless and not headless.load_balanced
    ext, _ = parse_service(svc({"type": "ExternalName", "externalName": "db.example"}), CONFIG)
    assert not ext.load_balanced


def test_missing_cluster_ip_is_left_for_allocation():
    spec, _ = parse_service(svc({"ports": [{"port": 80}]}), CONFIG)
    assert spec.cluster_ip is None


@pytest.mark.parametrize("spec,field,words", [
    ({"ports": [{"port": 80, "protocol": "SCTP"}]}, "spec.ports[0].protocol", "SCTP is not supported"),
    ({"ports": [{"port": 80, "protocol": "ICMP"}]}, "spec.ports[0].protocol", "not a supported protocol"),
    ({"ports": [{"port": 0}]}, "spec.ports[0].port", "not in 1-65535"),
    ({"ports": [{"port": "80"}]}, "spec.ports[0].port", "integer port number"),
    ({"ports": [{"port": 80, "targetPort": 70000}]}, "spec.ports[0].targetPort", "not in 1-65535"),
    ({"ports": [{"port": 80, "targetPort": "Not_A_Name"}]}, "spec.ports[0].targetPort", "neither a port number"),
    ({"ports": []}, "spec.ports", "at least one port"),
    ({"ports": [{"port": 80}, {"port": 81}]}, "spec.ports[0].name", "required when a Service has several ports"),
    ({"ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}, "spec.ports[1].name", "already the name"),
    ({"ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80}]}, "spec.ports[1].port", "80/TCP is already"),
    ({"type": "NodePort", "ports": [{"port": 80, "nodePort": 8080}]}, "spec.ports[0].nodePort",
     "outside the NodePort range 30000-32767"),
    ({"ports": [{"port": 80, "nodePort": 30001}]}, "spec.ports[0].nodePort", "only be set for type NodePort"),
    ({"type": "Bogus", "ports": [{"port": 80}]}, "spec.type", "not a Service type"),
    ({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}, "spec.clusterIP", "not an IP address"),
    ({"externalIPs": ["nope"], "ports": [{"port": 80}]}, "spec.externalIPs[0]", "not an IP address"),
    ({"externalTrafficPolicy": "Nearest", "ports": [{"port": 80}]}, "spec.externalTrafficPolicy", "Cluster or Local"),
    ({"internalTrafficPolicy": "local", "ports": [{"port": 80}]}, "spec.internalTrafficPolicy", "Cluster or Local"),
    ({"sessionAffinity": "Cookie", "ports": [{"port": 80}]}, "spec.sessionAffinity", "None or ClientIP"),
    ({"selector": ["app"], "ports": [{"port": 80}]}, "spec.selector", "must map label keys"),
])
def test_bad_services_name_the_field(spec, field, words):
    err = errors_of(svc(spec))[0]
    assert (err.source, err.obj, err.field) == ("svc.yaml", "Service shop/web", field)
    assert words in err.message
    assert str(err).startswith(f"svc.yaml: Service shop/web: {field}: ")


def test_bad_annotation():
    err = one_error(svc({"ports": [{"port": 80}]}, annotations={"service.cilium.io/lb-algorithm": "round-robin"}))
    assert err.field == "metadata.annotations[service.cilium.io/lb-algorithm]"
    assert "random or maglev" in err.message


def test_all_errors_reported_at_once():
    errs = errors_of(svc({"type": "NodePort", "externalIPs": ["x"], "sessionAffinity": "Cookie",
                          "ports": [{"name": "a", "port": 80, "protocol": "ICMP"},
                                    {"name": "b", "port": 81, "nodePort": 70000}]}))
    assert [e.field for e in errs] == ["spec.ports[0].protocol", "spec.ports[1].nodePort", "spec.externalIPs[0]",
                                       "spec.sessionAffinity"]
    # What the parser accepts and this node cannot serve is reported all at once, too.
    with pytest.raises(ServiceValidationError) as e:
        parse_service(svc({"type": "NodePort", "ports": [{"name": "a", "port": 80, "protocol": "SCTP"},
                                                         {"name": "b", "port": 81, "nodePort": 5}]}), CONFIG)
    assert [err.field for err in e.value.errors] == ["spec.ports[0].protocol", "spec.ports[1].nodePort"]
    assert e.value.errors[0].obj == "Service shop/web" and e.value.errors[0].source == "svc.yaml"


def test_node_port_range_flag():
    assert parse_node_port_range("30000-32767") == (30000, 32767)
    assert ServiceConfig(node_port_range="20000-20010").in_node_port_range(20005)
    for bad in ("30000", "a-b", "40000-30000", "0-10", "1-70000"):
        with pytest.raises(ValueError, match="node port range"):
            parse_node_port_range(bad)
    custom = ServiceConfig(node_port_range="20000-20010")
    with pytest.raises(ServiceValidationError, match="outside the NodePort range 20000-20010"):
        parse_service(svc({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30000}]}), custom)


# -- the manifests source fills in what the API server would --------------------------------

def test_manifests_source_defaults_protocol_and_target_port():
    text = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.244.1.5]}]
ports: [{port: 8080}]
"""
    resources, errors = parse_documents(text, "m.yaml")
    assert errors == []
    service, endpoint_slice = resources
    [port] = service.ports
    assert (port.port, port.protocol, port.target_port) == (80, 6, 80)
    assert endpoint_slice.kind == "EndpointSlice" and endpoint_slice.labels == {"kubernetes.io/service-name": "web"}
    assert endpoint_slice.service_key == ("shop", "web") and endpoint_slice.ports[0].protocol == 6


# -- EndpointSlices ------------------------------------------------------------------------

def eslice(endpoints, ports=None, labels=None, address_type="IPv4", name="web-abc") -> dict:
    labels = {"kubernetes.io/service-name": "web"} if labels is None else labels
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "addressType": address_type, "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports}


def test_endpoint_slice_conditions_and_ports():
    spec = parse_endpoint_slice(eslice([
        {"addresses": ["10.244.1.5"], "conditions": {"ready": True}, "nodeName": "n1"},
        {"addresses": ["10.244.1.6", "10.244.1.60"]},                        # unknown: ready
        {"addresses": ["10.244.1.7"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["10.244.1.8"], "conditions": {"ready": False}}]), "eps.yaml")
    assert slice_warnings(spec) == []
    assert [(e.address, e.ready, e.serving, e.terminating, e.node_name) for e in spec.endpoints] == [
        ("10.244.1.5", True, True, False, "n1"), ("10.244.1.6", True, True, False, None),
        ("10.244.1.7", False, True, True, None), ("10.244.1.8", False, False, False, None)]
    assert [(p.name, p.port, p.protocol) for p in spec.ports] == [("http", 8080, 6)]


def test_endpoint_slice_errors():
    with pytest.raises(InvalidObject) as e:
        parse_endpoint_slice(eslice([{"addresses": ["10.244.1.500"]}, {"addresses": []},
                                     {"addresses": ["10.244.1.5"], "conditions": {"ready": "yes"}}],
                                    ports=[{"port": 0}], labels={}), "eps.yaml")
    fields = [err.field for err in e.value.errors]
    assert fields == ["metadata.labels[kubernetes.io/service-name]", "ports[0].port", "endpoints[0].addresses[0]",
                      "endpoints[1].addresses", "endpoints[2].conditions.ready"]
    assert e.value.errors[0].obj == "EndpointSlice shop/web-abc"


def test_ipv6_slices_are_ignored_with_a_warning():
    spec = parse_endpoint_slice(eslice([{"addresses": ["fd00::5"]}], address_type="IPv6"), "eps.yaml")
    [warning] = slice_warnings(spec)
    assert spec.endpoints == () and "IPv4 only" in warning.message
    assert (warning.obj, warning.field) == ("EndpointSlice shop/web-abc", "addressType")


# -- hostPorts -----------------------------------------------------------------------------

def pod(ports, name="p"):
    return parse_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "shop"},
                      "spec": {"containers": [{"name": "c", "ports": ports}]}}, "pod.yaml")


def test_host_ports():
    ports, errors, warnings = host_ports(pod([
        {"containerPort": 80, "hostPort": 8080},
        {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "10.245.1.1"},
        {"containerPort": 81, "hostPort": 30080},                      # inside the NodePort range
        {"containerPort": 82, "hostPort": 9000, "protocol": "SCTP"},
        {"containerPort": 83},
        {"containerPort": 84, "hostPort": 9001, "hostIP": "fd00::1"},    # no IPv6 traffic reaches it
        {"containerPort": 85, "hostPort": 9002, "hostIP": "0.0.0.0"}]), CONFIG)
    assert [(p.host_port, p.container_port, p.protocol, p.host_ip) for p in ports] == [
        (8080, 80, 6, None), (5353, 53, 17, "10.245.1.1"), (9002, 85, 6, None)]
    assert [w.field for w in warnings] == ["spec.containers[0].ports[2].hostPort"]
    assert "inside the NodePort range" in warnings[0].message and "ignored" in warnings[0].message
    assert [e.field for e in errors] == ["spec.containers[0].ports[3].protocol"]
    assert "SCTP is not supported" in errors[0].message
