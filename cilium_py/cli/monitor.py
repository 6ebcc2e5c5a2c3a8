"""`ciliumpy monitor`: live decoded datapath events from the node's agent."""

from __future__ import annotations

import json
import socket

import click

from cilium_py import defaults
from cilium_py.agent.paths import RunPaths

TYPES = ("drop", "trace", "policy-verdict")


def format_line(event: dict) -> str:
    from cilium_py.datapath.monitor import MonitorEvent, PacketSummary

    if event.get("type") == "lost":
        return f"Lost {event['count']} events"
    fields = dict(event)
    fields.pop("drop_reason_name", None)
    fields["packet"] = PacketSummary(**fields["packet"])
    return MonitorEvent(**fields).line()


@click.command()
@click.option("--node", envvar="CILIUMPY_NODE", default=defaults.NODE_NAME, show_default=True)
@click.option("--run-dir", envvar="CILIUMPY_RUN_DIR", default=defaults.RUN_DIR, show_default=True)
@click.option("-t", "--type", "types", type=click.Choice(TYPES), multiple=True,
              help="only events of this type (repeatable)")
@click.option("-j", "--json", "as_json", is_flag=True, help="one JSON object per event")
@click.option("-n", "--count", type=int, default=0, help="exit after this many events")
def monitor(node, run_dir, types, as_json, count):
    """Print datapath events as they happen (drops, traces, policy verdicts)."""
    path = RunPaths(run_dir, node).monitor_socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        raise click.ClickException(f"no agent is serving events for node {node} at {path}: "
                                   f"is `ciliumpy agent --node {node}` running?") from None
    shown = 0
    with sock, sock.makefile("r") as stream:
        if json.loads(stream.readline() or "{}").get("type") != "hello":
            raise click.ClickException(f"{path} did not answer like a ciliumpy agent")
        click.echo("Listening for events... Press Ctrl-C to quit", err=True)
        try:
            for line in stream:
                event = json.loads(line)
                if types and event.get("type") not in types and event.get("type") != "lost":
                    continue
                click.echo(line.rstrip() if as_json else format_line(event))
                shown += 1
                if count and shown >= count:
                    break
        except KeyboardInterrupt:
            pass
