"""`ciliumpy lab ...`: run ciliumpy on one machine (cilium_py.lab.lab)."""

from __future__ import annotations

import json

import click

from cilium_py.agent.client import AgentAPIError, AgentUnavailable
from cilium_py.lab.lab import Lab, LabError


def lab_name(fn):
    return click.option("--name", default="lab", show_default=True, envvar="CILIUMPY_LAB",
                        help="which lab")(fn)


def _lab(name: str) -> Lab:
    try:
        return Lab(name)
    except LabError as e:
        raise click.ClickException(str(e)) from None


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (LabError, AgentUnavailable, AgentAPIError) as e:
        raise click.ClickException(str(e)) from None


@click.group()
def lab():
    """A node namespace with pods from Pod manifests, an agent, and policies, on this machine."""


def manifests_command(timeout: float):
    """A lab command that takes manifests (-f FILE|DIR) and a time limit."""
    def decorate(fn):
        fn = lab_name(fn)
        fn = click.option("--timeout", type=float, default=timeout, show_default=True)(fn)
        fn = click.option("-f", "--filename", "path", required=True, type=click.Path(exists=True),
                          help="manifest file or directory")(fn)
        return lab.command()(fn)
    return decorate


@manifests_command(timeout=120.0)
def up(path, timeout, name):
    """Create the lab and wait until every pod enforces the current policy."""
    result = _run(_lab(name).up, path, timeout=timeout)
    click.echo(f"lab {name} is up: {result['endpoints']} endpoints, policy revision {result['revision']}")


@manifests_command(timeout=60.0)
def apply(path, timeout, name):
    """Add or change objects, like kubectl apply; returns once enforced."""
    click.echo(f"applied; policy revision {_run(_lab(name).apply, path, timeout=timeout)['revision']} realized")


@manifests_command(timeout=60.0)
def delete(path, timeout, name):
    """Remove the objects the files define, like kubectl delete; returns once enforced."""
    click.echo(f"deleted; policy revision {_run(_lab(name).delete, path, timeout=timeout)['revision']} realized")


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("target", metavar="NAMESPACE/POD")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD...")
@click.option("--external", is_flag=True,
              help="run CMD outside the node (the world namespace on the other end of the node's "
                   "eth0), e.g. a client of a NodePort; no NAMESPACE/POD then: lab exec --external -- CMD")
@lab_name
def exec_(target, argv, external, name):
    """Run a command inside a pod; its exit code is passed through."""
    if external:
        # No pod to name: what click took for the target is the command's first word.
        result = _run(_lab(name).exec_external, [target, *argv])
    elif not argv:
        raise click.UsageError("missing the command: lab exec NAMESPACE/POD -- CMD...")
    else:
        result = _run(_lab(name).exec, target, list(argv))
    raise SystemExit(result.returncode)


@lab.command()
@lab_name
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(name, output):
    """Show the lab's agent, endpoints and policy revision."""
    s = _run(_lab(name).status)
    if output == "json":
        click.echo(json.dumps(s, indent=2))
        return
    click.echo(f"lab {s['name']}: node namespace {s['node_netns']}, agent pid {s['agent_pid']} "
               f"({'running' if s['agent_running'] else 'NOT running'})")
    for ep in s.get("endpoints", []):
        click.echo(f"  {ep['pod']:30} {ep['ipv4']:15} identity {ep['identity']:<6} "
                   f"revision {ep['policy_revision']}")
    if "policy" in s:
        click.echo(f"policy revision {s['policy']['revision']}, "
                   f"{len(s['policy']['rejected'])} rejected object(s)")


@lab.command()
@lab_name
def down(name):
    """Remove everything the lab created."""
    for item in _lab(name).down():
        click.echo(f"removed {item}")
