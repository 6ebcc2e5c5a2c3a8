"""Commands that ask the running agent over its API socket: status, endpoint, identity,
policy. (`ciliumpy bpf ...` reads the maps instead and works without an agent.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from cilium_py import defaults
from cilium_py.agent.client import AgentAPIError, AgentClient, AgentUnavailable, api_socket
from cilium_py.cli.options import emit, output_option


def agent_options(fn):
    fn = click.option("--run-dir", envvar="CILIUMPY_RUN_DIR", default=defaults.RUN_DIR,
                      show_default=True, help="the agent's run directory")(fn)
    fn = click.option("--node", envvar="CILIUMPY_NODE", default=defaults.NODE_NAME,
                      show_default=True, help="node whose agent to ask")(fn)
    return fn


def call(node: str, run_dir: str, method: str, *args):
    client = AgentClient(api_socket(run_dir, node))
    try:
        return getattr(client, method)(*args)
    except AgentUnavailable as e:
        raise click.ClickException(str(e)) from None
    except AgentAPIError as e:
        raise click.ClickException(f"the agent answered: {e}") from None


@click.command()
@agent_options
@output_option
def status(node, run_dir, output):
    """Show the agent's health, like `cilium status`."""
    s = call(node, run_dir, "status")
    if output == "json":
        click.echo(json.dumps(s, indent=2))
        return
    controllers = s["controllers"]
    failing = {n: c for n, c in controllers.items() if c.get("last_error")}
    dp = s["datapath"]
    click.echo(f"Node:               {s['node']}")
    click.echo(f"Datapath:           Ok   {dp['bpf_root']} (events: {dp['events']}, "
               f"{dp['events_received']} received, {dp['events_lost']} lost)")
    store_errors = s["store"]["errors"]
    click.echo(f"Store:              {s['store']['source']}: {s['store']['objects']} objects, "
               f"{len(store_errors)} rejected")
    _print_kubernetes(s.get("kubernetes"))
    _print_kubernetes_writes(s.get("kubernetes"))
    click.echo(f"Controller Status:  {len(controllers) - len(failing)}/{len(controllers)} healthy")
    for name, c in failing.items():
        click.echo(f"  {name}: {c['failures']} failures, last error: {c['last_error']}")
    click.echo(f"Endpoints:          {s['endpoints']}")
    click.echo(f"Identities:         {s['identities']}")
    failed = s["policy"].get("failed_endpoints") or {}
    click.echo(f"Policy revision:    {s['policy']['revision']} (realized {s['policy']['realized']}"
               + (f", {len(failed)} endpoints not realized)" if failed else ")"))
    for pod, why in failed.items():
        click.echo(f"  {pod}: {why}")
    pressure = ", ".join(f"{k} {v:.1%}" for k, v in s["map_pressure"].items())
    click.echo(f"Map pressure:       {pressure}")
    hubble = s.get("hubble", {})
    if hubble.get("enabled"):
        where = hubble["socket"] + (f", tcp {hubble['listen_address']}" if hubble["listen_address"] else "")
        lost = sum(hubble["lost"].values())
        click.echo(f"Hubble:             Ok   Current/Max Flows: {hubble['flows']}/{hubble['max_flows']}, "
                   f"seen {hubble['seen_flows']}, {lost} lost; {where}")
    else:
        click.echo("Hubble:             Disabled")
    _print_kpr(s.get("kube_proxy_replacement"))
    for name, address in sorted(s.get("metrics", {}).items()):
        click.echo(f"Metrics ({name}):" + " " * max(1, 10 - len(name)) + f"http://{address}/metrics")
    for err in store_errors:
        click.echo(f"  rejected: {err['source']}: {err['object']}: {err['field']}: {err['message']}")


def _print_kubernetes(kube: dict | None, now: float | None = None) -> None:
    """The API server and, per resource, the connection state and how fresh it is."""
    if not kube:
        return
    api = kube.get("api_server") or {}
    resources = kube.get("resources") or {}
    watched = {k: r for k, r in resources.items() if r.get("state") != "skipped"}
    synced = sum(1 for r in watched.values() if r.get("synced"))
    version = api.get("version") or f"version unknown ({api.get('version_error') or 'not asked yet'})"
    health = "Ok  " if synced == len(watched) else "Warn"
    click.echo(f"Kubernetes:         {health} {version} at {api.get('host', '?')}, "
               f"{synced}/{len(watched)} resources synced")
    now = time.time() if now is None else now
    width = max((len(k) for k in resources), default=0)
    for kind, r in resources.items():
        if r.get("state") == "skipped":
            click.echo(f"  {kind:<{width}}  skipped    ({r.get('last_error', '')})")
            continue
        last = r.get("last_event")
        age = f"last event {_age(now - last)} ago" if last else "no event yet"
        line = (f"  {kind:<{width}}  {r['state']:<9}  rv {r.get('resource_version') or '-'}, "
                f"{r.get('events', 0)} events, {age}, {r.get('relists', 0)} relists")
        if r.get("rejected"):
            line += f", {r['rejected']} rejected"
        if r.get("last_error"):
            line += f"; last error: {r['last_error']}"
        click.echo(line)


def _print_kubernetes_writes(kube: dict | None) -> None:
    """What the agent keeps in the API server: its CiliumNode, identities, CiliumEndpoints
    and the policies' Valid condition."""
    if not kube or "ciliumnode" not in kube:
        return
    node = kube["ciliumnode"]
    state = "Ok  " if node["state"] == "ready" else "Warn"
    click.echo(f"CiliumNode:         {state} {node['name']}: {node['message']}")
    ids = kube.get("identities") or {}
    click.echo(f"CiliumIdentities:   {ids.get('held', 0)} used here, {ids.get('known', 0)} in the cluster "
               f"({ids.get('created', 0)} created, {ids.get('adopted', 0)} adopted)")
    ceps = kube.get("ciliumendpoints") or {}
    click.echo(f"CiliumEndpoints:    {ceps.get('in_sync', 0)}/{ceps.get('endpoints', 0)} written, "
               f"{kube.get('remote_endpoints', 0)} remote addresses")
    for pod, error in (ceps.get("errors") or {}).items():
        click.echo(f"  {pod}: {error}")
    policies = kube.get("policy_status") or {}
    click.echo(f"Policy status:      {policies.get('valid', 0)} valid, {policies.get('invalid', 0)} invalid")
    for name, error in (policies.get("errors") or {}).items():
        click.echo(f"  {name}: {error}")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _print_kpr(kpr: dict | None) -> None:
    """The kube-proxy replacement lines, as `cilium status` words them."""
    if not kpr:
        return
    on_off = {True: "Enabled", False: "Disabled"}
    details = (f"Socket LB: {on_off[bool(kpr['socket_lb'])]}, NodePort range {kpr['node_port_range']}, "
               f"Backend Selection: {kpr['algorithm'].capitalize()}, XDP Acceleration: {kpr['acceleration']}")
    click.echo(f"KubeProxyReplacement: {'True' if kpr.get('enabled') else 'False'}   [{details}]")
    if not kpr.get("enabled"):
        return
    types = ", ".join(kpr.get("service_types_in_use") or []) or "none"
    click.echo(f"Services:           {kpr['services']} services, {kpr['frontends']} frontends, "
               f"{kpr['backends']} backends, {kpr['rejected']} rejected (in use: {types})")
    for err in (kpr.get("problems") or {}).get("rejected", []):
        click.echo(f"  rejected: {err['source']}: {err['object']}: {err['field']}: {err['message']}")


@click.group()
def endpoint():
    """Endpoints managed by the agent."""


@endpoint.command("list")
@agent_options
@output_option
def endpoint_list(node, run_dir, output):
    """List endpoints with their identity, labels and policy enforcement."""
    eps = call(node, run_dir, "endpoints")
    if output == "json":
        emit(output, eps, [])
        return
    def on_off(flag):
        return "Enabled" if flag else "Disabled"
    rows = []
    for ep in eps:
        labels = ep["labels"] or [""]
        for i, label in enumerate(labels):
            first = i == 0
            rows.append({
                "id": ep["id"] if first else "",
                "ingress": on_off(ep["policy_enforcement"]["ingress"]) if first else "",
                "egress": on_off(ep["policy_enforcement"]["egress"]) if first else "",
                "identity": ep["identity"] if first else "", "label": label,
                "ipv4": ep["ipv4"] if first else "", "status": ep["status"] if first else ""})
    emit(output, rows, [("ENDPOINT", "id"), ("POLICY (ingress) ENFORCEMENT", "ingress"),
                        ("POLICY (egress) ENFORCEMENT", "egress"), ("IDENTITY", "identity"),
                        ("LABELS (source:key[=value])", "label"), ("IPv4", "ipv4"),
                        ("STATUS", "status")], empty="No endpoints.")
    for ep in eps:
        if ep.get("error"):
            click.echo(f"endpoint {ep['id']} ({ep['pod']}) {ep['status']}: {ep['error']}")


@endpoint.command("get")
@click.argument("endpoint_id", type=int)
@agent_options
def endpoint_get(endpoint_id, node, run_dir):
    """Show one endpoint as JSON."""
    click.echo(json.dumps(call(node, run_dir, "endpoint", endpoint_id), indent=2))


@click.group()
def identity():
    """Security identities."""


@identity.command("list")
@agent_options
@output_option
def identity_list(node, run_dir, output):
    """List identities and their labels."""
    ids = call(node, run_dir, "identities")
    if output == "json":
        emit(output, ids, [])
        return
    rows = []
    for ident in ids:
        for i, label in enumerate(ident["labels"] or [""]):
            rows.append({"id": ident["id"] if i == 0 else "", "label": label})
    emit(output, rows, [("ID", "id"), ("LABELS", "label")])


@identity.command("get")
@click.argument("identity_id", type=int)
@agent_options
def identity_get(identity_id, node, run_dir):
    """Show one identity as JSON."""
    click.echo(json.dumps(call(node, run_dir, "identity", identity_id), indent=2))


@click.group()
def policy():
    """Network policy: what is in effect, offline validation, waiting for enforcement."""


@policy.command("get")
@agent_options
@output_option
def policy_get(node, run_dir, output):
    """Policies in effect and rejected objects with their reasons."""
    view = call(node, run_dir, "policy")
    if output == "json":
        click.echo(json.dumps(view, indent=2))
        return
    click.echo(f"Revision: {view['revision']} (realized {view['realized_revision']})")
    for p in view["policies"]:
        where = f"{p['namespace']}/" if p["namespace"] else ""
        click.echo(f"  {p['kind']} {where}{p['name']}")
    if view["rejected"]:
        click.echo("Rejected:")
        for err in view["rejected"]:
            click.echo(f"  {err['source']}: {err['object']}: {err['field']}: {err['message']}")


@policy.command("validate")
@click.argument("path", type=click.Path(exists=True))
def policy_validate(path):
    """Check policy and manifest files offline (no agent needed)."""
    from cilium_py.agent.sources.manifests import parse_documents

    files = sorted(p for p in Path(path).rglob("*") if p.suffix in (".yaml", ".yml", ".json")) \
        if Path(path).is_dir() else [Path(path)]
    problems = 0
    for f in files:
        resources, errors = parse_documents(f.read_text(), str(f))
        for err in errors:
            click.echo(str(err), err=True)
        problems += len(errors)
        for res in resources:
            where = f"{res.namespace}/" if res.namespace else ""
            click.echo(f"{f}: {res.kind} {where}{res.name}: valid")
    if problems:
        raise click.ClickException(f"{problems} invalid object(s)")


@policy.command("wait")
@click.argument("revision", type=int)
@click.option("--timeout", type=float, default=30.0, show_default=True)
@agent_options
def policy_wait(revision, timeout, node, run_dir):
    """Wait until every endpoint realizes REVISION."""
    result = call(node, run_dir, "wait_revision", revision, timeout)
    if not result["realized"]:
        raise click.ClickException(f"revision {revision} not realized within {timeout}s "
                                   f"(realized: {result['revision']})")
    failed = result.get("failed_endpoints") or {}
    if failed:
        raise click.ClickException(f"revision {revision} not realized on {len(failed)} endpoint(s):\n"
                                   + "\n".join(f"  {pod}: {why}" for pod, why in failed.items()))
    click.echo(f"Revision {revision} realized (now {result['revision']})")
