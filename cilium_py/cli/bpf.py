"""`ciliumpy bpf ...`: read and change the pinned maps directly, agent or no agent."""

from __future__ import annotations

import ipaddress

import click

from cilium_py.cli.options import emit, node_options, open_map, output_option
from cilium_py.datapath.maps.conntrack import CtAnyMap, CtTcpMap
from cilium_py.datapath.maps.endpoints import EndpointMap
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.datapath.maps.metrics import MetricsMap
from cilium_py.datapath.maps.nat import NatMap
from cilium_py.datapath.maps.policy import PolicyMap
from cilium_py.datapath.maps.prefilter import PrefilterMap
from cilium_py.vocab import protocol_name


@click.group()
def bpf():
    """Inspect and manage the datapath's BPF maps."""


@bpf.group()
def endpoint():
    """Local endpoints (ciliumpy_lxc)."""


@endpoint.command("list")
@node_options
@output_option
def endpoint_list(node, bpf_root, output):
    """List local endpoints."""
    with open_map(EndpointMap, node, bpf_root) as m:
        rows = [{"ip": str(e.ip), "endpoint_id": e.endpoint_id, "ifindex": e.ifindex,
                 "identity": e.identity, "mac": e.mac, "node_mac": e.node_mac,
                 "host": e.is_host, "policy_ingress": e.ingress_enforced,
                 "policy_egress": e.egress_enforced} for e in m.list()]
    emit(output, rows, [
        ("IP ADDRESS", "ip"),
        ("LOCAL ENDPOINT INFO", lambda r: "(localhost)" if r["host"] else
         f"id={r['endpoint_id']} sec_id={r['identity']} flags=0x{(2 if r['policy_ingress'] else 0) | (4 if r['policy_egress'] else 0):04x} "
         f"ifindex={r['ifindex']} mac={r['mac']} nodemac={r['node_mac']}"),
    ], empty="No entries found.")


@bpf.group()
def ct():
    """Connection tracking tables."""


def _check_global(scope):
    if scope != "global":
        raise click.BadParameter(f"only the 'global' tables exist, not {scope!r}", param_hint="SCOPE")


@ct.command("list")
@click.argument("scope", metavar="SCOPE")
@node_options
@output_option
def ct_list(scope, node, bpf_root, output):
    """List connection tracking entries (SCOPE: global)."""
    _check_global(scope)
    conns = []
    for cls in (CtTcpMap, CtAnyMap):
        with open_map(cls, node, bpf_root) as m:
            conns.extend(m.connections())
    conns.sort(key=lambda c: (c.protocol, int(c.saddr), c.sport, int(c.daddr), c.dport, c.direction))
    if output == "json":
        rows = [{"protocol": protocol_name(c.protocol), "direction": c.direction,
                 "source": f"{c.saddr}:{c.sport}", "destination": f"{c.daddr}:{c.dport}",
                 "expires_in": c.expires_in, "rx_packets": c.rx_packets, "rx_bytes": c.rx_bytes,
                 "tx_packets": c.tx_packets, "tx_bytes": c.tx_bytes,
                 "rx_flags_seen": c.rx_flags_seen, "tx_flags_seen": c.tx_flags_seen,
                 "flags": c.flag_names, "source_security_id": c.src_identity,
                 "ifindex": c.ifindex} for c in conns]
        emit(output, rows, [])
        return
    if not conns:
        click.echo("No entries found.")
    for c in conns:
        click.echo(c.line())


@ct.command("flush")
@click.argument("scope", metavar="SCOPE")
@node_options
@output_option
def ct_flush(scope, node, bpf_root, output):
    """Remove every connection tracking entry (SCOPE: global)."""
    _check_global(scope)
    removed = 0
    for cls in (CtTcpMap, CtAnyMap):
        with open_map(cls, node, bpf_root) as m:
            removed += m.clear()
    _flushed(output, removed, "the global conntrack tables")


def _flushed(output: str, removed: int, where: str) -> None:
    if output == "json":
        emit(output, [{"deleted": removed}], [])
    else:
        click.echo(f"Flushed {removed} entries from {where}")


@bpf.group()
def nat():
    """NAT of NodePort/LoadBalancer connections through the node's devices."""


@nat.command("list")
@node_options
@output_option
def nat_list(node, bpf_root, output):
    """List NAT mappings (both directions of each translated connection)."""
    with open_map(NatMap, node, bpf_root) as m:
        mappings = m.mappings()
    if output == "json":
        emit(output, [x.to_dict() for x in mappings], [])
        return
    if not mappings:
        click.echo("No entries found.")
    for x in mappings:
        click.echo(x.line())


@nat.command("flush")
@node_options
@output_option
def nat_flush(node, bpf_root, output):
    """Remove every NAT mapping."""
    with open_map(NatMap, node, bpf_root) as m:
        removed = m.flush()
    _flushed(output, removed, "the NAT table")


@bpf.group()
def policy():
    """Per-endpoint policy entries."""


@policy.command("get")
@click.argument("endpoint_id", type=click.IntRange(1, 65535), metavar="ENDPOINT")
@node_options
@output_option
def policy_get(endpoint_id, node, bpf_root, output):
    """List the policy entries of one endpoint (by endpoint ID)."""
    with open_map(PolicyMap, node, bpf_root) as m:
        entries = m.entries(endpoint_id)
    rows = []
    for key, value in entries.items():
        if key.protocol == 0:
            port = "ANY"
        else:
            lo, hi = key.port_range
            proto = protocol_name(key.protocol)
            if key.port_prefix == 0:
                port = f"ANY/{proto}"
            elif lo == hi:
                port = f"{lo}/{proto}"
            else:
                port = f"{lo}-{hi}/{proto}"
        rows.append({"policy": "Deny" if value.deny else "Allow",
                     "direction": key.direction.capitalize(), "identity": key.identity,
                     "port": port, "cookie": value.cookie, "bytes": value.bytes,
                     "packets": value.packets, "prefix": key.to_c().prefixlen})
    emit(output, rows, [("POLICY", "policy"), ("DIRECTION", "direction"),
                        ("IDENTITY", lambda r: r["identity"] or "ANY"), ("PORT/PROTO", "port"),
                        ("COOKIE", "cookie"), ("BYTES", "bytes"), ("PACKETS", "packets"),
                        ("PREFIX", "prefix")],
         empty=f"No policy entries for endpoint {endpoint_id}.")


@bpf.group()
def ipcache():
    """IP/CIDR to identity mappings."""


@ipcache.command("list")
@node_options
@output_option
def ipcache_list(node, bpf_root, output):
    """List IP/CIDR to identity mappings."""
    with open_map(IPCacheMap, node, bpf_root) as m:
        rows = [{"prefix": str(e.prefix), "identity": e.identity,
                 "tunnel_endpoint": str(e.tunnel_endpoint), "encrypt_key": e.encrypt_key,
                 "node_id": e.node_id} for e in m.list()]
    emit(output, rows, [("IP PREFIX/ADDRESS", "prefix"),
                        ("IDENTITY", lambda r: f"identity={r['identity']} encryptkey={r['encrypt_key']} "
                                               f"tunnelendpoint={r['tunnel_endpoint']} nodeid={r['node_id']}")],
         empty="No entries found.")


@bpf.group()
def metrics():
    """Datapath packet counters."""


@metrics.command("list")
@node_options
@output_option
def metrics_list(node, bpf_root, output):
    """List per-reason, per-direction packet and byte counters."""
    with open_map(MetricsMap, node, bpf_root) as m:
        rows = [{"reason": m_.reason_name, "reason_code": m_.reason,
                 "direction": m_.direction_name, "packets": m_.packets, "bytes": m_.bytes}
                for m_ in m.list()]
    emit(output, rows, [("REASON", "reason"), ("DIRECTION", "direction"), ("PACKETS", "packets"),
                        ("BYTES", "bytes")], empty="No entries found.")


@bpf.group()
def prefilter():
    """The XDP CIDR deny list on node devices."""


def _cidr(value: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError as e:
        raise click.BadParameter(f"{value!r} is not an IPv4 CIDR with host bits clear ({e})") from None


@prefilter.command("list")
@node_options
@output_option
def prefilter_list(node, bpf_root, output):
    """List denied CIDRs."""
    with open_map(PrefilterMap, node, bpf_root) as m:
        rows = [{"prefix": str(n)} for n in m.list()]
    emit(output, rows, [("DENIED PREFIX", "prefix")], empty="No entries found.")


@prefilter.command("update")
@click.argument("cidrs", nargs=-1, required=True)
@node_options
@output_option
def prefilter_update(cidrs, node, bpf_root, output):
    """Deny traffic from CIDRs at XDP."""
    nets = [_cidr(c) for c in cidrs]  # validate all before changing anything
    with open_map(PrefilterMap, node, bpf_root) as m:
        for net in nets:
            m.deny(net)
    emit(output, [{"prefix": str(n), "action": "added"} for n in nets],
         [("PREFIX", "prefix"), ("ACTION", "action")])


@prefilter.command("delete")
@click.argument("cidrs", nargs=-1, required=True)
@node_options
@output_option
def prefilter_delete(cidrs, node, bpf_root, output):
    """Stop denying CIDRs."""
    nets = [_cidr(c) for c in cidrs]
    with open_map(PrefilterMap, node, bpf_root) as m:
        rows = [{"prefix": str(n), "action": "deleted" if m.allow(n) else "not found"} for n in nets]
    emit(output, rows, [("PREFIX", "prefix"), ("ACTION", "action")])
    if any(r["action"] == "not found" for r in rows):
        raise SystemExit(1)
