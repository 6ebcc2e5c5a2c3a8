"""`ciliumpy service list|get` (asks the agent) and `ciliumpy bpf lb list`, `bpf lb maglev
list|get` (read the pinned maps, agent or no agent), in the columns of Cilium's CLI."""

from __future__ import annotations

import json
import os

import click
import numpy as np

from cilium_py.cli.agentapi import agent_options, call
from cilium_py.cli.options import datapath_config, emit, node_options, open_map, output_option
from cilium_py.datapath import libbpf
from cilium_py.datapath.maps.lb import (
    ALGORITHMS,
    SCOPE_INTERNAL,
    BackendsMap,
    MaglevMap,
    RevNatMap,
    ServicesMap,
    flag_names,
)
from cilium_py.vocab import protocol_name

ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}


def _addr(address, port, proto) -> str:
    return f"{address}:{port}/{protocol_name(proto)}"


# -- ciliumpy service ----------------------------------------------------------------------

@click.group()
def service():
    """Services the agent load-balances (kube-proxy replacement)."""


def _backend_text(i: int, b: dict) -> str:
    return f"{i} => {b['address']}:{b['port']}/{b['protocol']} ({b['state']})"


def _service_rows(views: list[dict]) -> list[dict]:
    """One row per backend, like `cilium service list`: ID, frontend and type on the first."""
    rows = []
    for v in views:
        kind = ", ".join([v["type"]] + [f for f in v["flags"] if f not in (v["type"], "ClusterIP", "Routable")])
        scopes = [("", v["backends"])]
        if "internal_backends" in v:
            scopes.append(("/i", v["internal_backends"]))
        for suffix, backends in scopes:
            lines = [_backend_text(i, b) for i, b in enumerate(backends, start=1)] or [""]
            for i, line in enumerate(lines):
                first = i == 0
                rows.append({"id": v["id"] if first else "", "frontend": v["frontend"] + suffix if first else "",
                             "type": kind if first else "", "backend": line})
    return rows


@service.command("list")
@agent_options
@output_option
def service_list(node, run_dir, output):
    """List service frontends and their backends (ID, frontend, service type, backends)."""
    data = call(node, run_dir, "get", "/v1/services")
    if output == "json":
        click.echo(json.dumps(data["services"], indent=2))
        return
    emit(output, _service_rows(data["services"]),
         [("ID", "id"), ("Frontend", "frontend"), ("Service Type", "type"), ("Backend", "backend")],
         empty="No services.")
    _print_problems(data)


def _print_problems(data: dict) -> None:
    for title, key in (("Rejected", "rejected"), ("Warnings", "warnings")):
        if data.get(key):
            click.echo(f"{title}:")
            for err in data[key]:
                where = ": ".join(p for p in (err["source"], err["object"], err["field"]) if p)
                click.echo(f"  {where}: {err['message']}")


@service.command("get")
@click.argument("service_id", type=click.IntRange(1, 65535), metavar="ID")
@agent_options
@output_option
def service_get(service_id, node, run_dir, output):
    """Show one service frontend by ID."""
    v = call(node, run_dir, "get", f"/v1/services/{service_id}")
    if output == "json":
        click.echo(json.dumps(v, indent=2))
        return
    owner = f"{v['kind']} {v['namespace']}/{v['name']}" + (f" port {v['port_name']}" if v["port_name"] else "")
    click.echo(f"ID:               {v['id']}")
    click.echo(f"Frontend:         {v['frontend']}")
    click.echo(f"Service Type:     {v['type']}")
    click.echo(f"Flags:            {', '.join(v['flags'])}")
    click.echo(f"Object:           {owner}")
    click.echo(f"Algorithm:        {v['algorithm']}")
    affinity = f"ClientIP, {v['session_affinity_timeout']}s" if v["session_affinity_timeout"] else "None"
    click.echo(f"Session affinity: {affinity}")
    for title, key in (("Backends", "backends"), ("Internal backends", "internal_backends")):
        if key in v:
            click.echo(f"{title}:" + ("" if v[key] else " none"))
            for i, b in enumerate(v[key], start=1):
                click.echo(f"  {_backend_text(i, b)}  id={b['id']}{'  local' if b['local'] else ''}")


# -- ciliumpy bpf lb -----------------------------------------------------------------------

@click.group("lb")
def lb():
    """Load-balancing maps: services, backends, reverse NAT, Maglev."""


def _read_services(node: str, bpf_root: str):
    with open_map(ServicesMap, node, bpf_root) as services, open_map(BackendsMap, node, bpf_root) as backends:
        return services.list(), {b.backend_id: b for b in backends.list()}


def _frontend_text(fe) -> str:
    return _addr(fe.address, fe.port, fe.proto) + ("/i" if fe.scope == SCOPE_INTERNAL else "")


def _lb_rows(entries, backends) -> list[dict]:
    rows = []
    for e in entries:
        fe = _frontend_text(e.frontend)
        algorithm = ALGORITHM_NAMES.get(e.algorithm, "default")
        rows.append({"service": f"{fe} (0)", "frontend": fe, "slot": 0, "service_id": e.service_id,
                     "flags": flag_names(e.flags), "count": len(e.backend_ids) - e.qcount,
                     "qcount": e.qcount, "algorithm": algorithm,
                     "affinity_timeout": e.affinity_timeout,
                     "backend": f"0.0.0.0:0 ({e.service_id}) (0) [{', '.join(flag_names(e.flags))}]"})
        for slot, backend_id in enumerate(e.backend_ids, start=1):
            be = backends.get(backend_id)
            if be is None:
                text = f"backend {backend_id} missing ({e.service_id}) ({slot})"
                state, address = "missing", ""
            else:
                address = _addr(be.address, be.port, be.proto)
                state = be.state_name
                text = f"{address} ({e.service_id}) ({slot})" + ("" if be.state == 0 else f" [{state}]")
            rows.append({"service": f"{fe} ({slot})", "frontend": fe, "slot": slot,
                         "service_id": e.service_id, "backend_id": backend_id,
                         "backend_address": address, "state": state, "backend": text})
    return rows


@lb.command("list")
@click.option("--frontends", "what", flag_value="frontends", help="only the master entries")
@click.option("--backends", "what", flag_value="backends", help="the backends map")
@click.option("--revnat", "what", flag_value="revnat", help="the reverse-NAT map")
@node_options
@output_option
def lb_list(what, node, bpf_root, output):
    """List the service map (frontend, then each backend slot), or another lb map."""
    if what == "backends":
        with open_map(BackendsMap, node, bpf_root) as m:
            rows = [{"id": b.backend_id, "address": _addr(b.address, b.port, b.proto), "state": b.state_name,
                     "local": b.local} for b in m.list()]
        emit(output, rows, [("ID", "id"), ("BACKEND ADDRESS", "address"), ("STATE", "state"),
                            ("LOCAL", lambda r: "local" if r["local"] else "")], empty="No entries found.")
        return
    if what == "revnat":
        with open_map(RevNatMap, node, bpf_root) as m:
            rows = [{"id": sid, "address": f"{a}:{p}"} for sid, a, p in m.list()]
        emit(output, rows, [("ID", "id"), ("REVERSE NAT ADDRESS", "address")], empty="No entries found.")
        return
    entries, backends = _read_services(node, bpf_root)
    rows = _lb_rows(entries, backends)
    if what == "frontends":
        rows = [r for r in rows if r["slot"] == 0]
    emit(output, rows, [("SERVICE ADDRESS", "service"), ("BACKEND ADDRESS (REVNAT_ID) (SLOT)", "backend")],
         empty="No entries found.")


@lb.group("maglev")
def maglev():
    """Maglev lookup tables (one per service ID)."""


def _distribution(table: np.ndarray) -> dict[int, int]:
    ids, counts = np.unique(table, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def _maglev_map(node: str, bpf_root: str) -> MaglevMap:
    """The Maglev map, sized like the tables in it: the size is the agent's
    --bpf-lb-maglev-table-size, which the CLI reads off an inner map instead of asking
    for it (reading a table into a buffer of another size would go wrong)."""
    m = open_map(lambda root: MaglevMap(root, datapath_config(node, bpf_root).maglev_table_size),
                 node, bpf_root)
    for sid in m.service_ids():
        map_id = m.lookup(MaglevMap.KEY(sid))
        if map_id is None:
            continue
        fd = libbpf.map_fd_by_id(map_id.value)
        try:
            m.table_size = libbpf.map_info(fd).value_size // 4
        finally:
            os.close(fd)
        break
    return m


@maglev.command("list")
@node_options
@output_option
def maglev_list(node, bpf_root, output):
    """Service IDs with a Maglev table and how its slots spread over backend IDs."""
    with _maglev_map(node, bpf_root) as m:
        rows = []
        for sid in m.service_ids():
            table = m.get_table(sid)
            if table is None:
                continue
            rows.append({"service_id": sid, "table_size": int(table.size), "distribution": _distribution(table)})
    emit(output, rows, [("SERVICE ID", "service_id"), ("TABLE SIZE", "table_size"),
                        ("BACKEND ID: SLOTS",
                         lambda r: " ".join(f"{b}:{n}" for b, n in r["distribution"].items()))],
         empty="No entries found.")


@maglev.command("get")
@click.argument("service_id", type=click.IntRange(1, 65535), metavar="ID")
@click.option("--full", is_flag=True, help="print every entry of the table, like Cilium")
@node_options
@output_option
def maglev_get(service_id, full, node, bpf_root, output):
    """The Maglev table of one service ID: slots per backend ID (and the table with --full)."""
    with _maglev_map(node, bpf_root) as m:
        table = m.get_table(service_id)
    if table is None:
        raise click.ClickException(f"service {service_id} has no Maglev table")
    dist = _distribution(table)
    if output == "json":
        out = {"service_id": service_id, "table_size": int(table.size), "distribution": dist}
        if full:
            out["table"] = table.tolist()
        click.echo(json.dumps(out, indent=2))
        return
    if full:
        click.echo(f"[{service_id}]/v4")
        click.echo(", ".join(str(int(x)) for x in table))
        return
    rows = [{"backend_id": b, "slots": n, "share": f"{n / table.size:.1%}"} for b, n in dist.items()]
    emit(output, rows, [("BACKEND ID", "backend_id"), ("SLOTS", "slots"), ("SHARE", "share")])
    click.echo(f"{table.size} slots, {len(dist)} backends")

