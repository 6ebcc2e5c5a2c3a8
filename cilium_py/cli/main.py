"""The `ciliumpy` command: thin click commands over the library."""

from __future__ import annotations

import click

from cilium_py import __version__
from cilium_py.cli.agent import agent
from cilium_py.cli.agentapi import endpoint, identity, policy, status
from cilium_py.cli.bpf import bpf
from cilium_py.cli.lab import lab
from cilium_py.cli.monitor import monitor
from cilium_py.cli.operator import operator
from cilium_py.cli.service import lb, service


@click.group()
@click.version_option(__version__, prog_name="ciliumpy")
def cli():
    """ciliumpy: eBPF networking and security for Kubernetes, in Python."""


cli.add_command(agent)
cli.add_command(bpf)
cli.add_command(monitor)
cli.add_command(status)
cli.add_command(endpoint)
cli.add_command(identity)
cli.add_command(policy)
cli.add_command(lab)
cli.add_command(service)
cli.add_command(operator)
bpf.add_command(lb)

if __name__ == "__main__":
    cli()
