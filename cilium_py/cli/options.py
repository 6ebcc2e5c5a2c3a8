"""Options shared by the commands, and the one place output formats are decided."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import click

from cilium_py import defaults
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.base import MapLayoutError, MapNotFound


def node_options(fn):
    fn = click.option("--bpf-root", envvar="CILIUMPY_BPF_ROOT", default=defaults.BPF_ROOT,
                      show_default=True, help="bpffs directory holding one directory per node")(fn)
    fn = click.option("--node", envvar="CILIUMPY_NODE", default=defaults.NODE_NAME,
                      show_default=True, help="node whose datapath to use")(fn)
    return fn


def output_option(fn):
    return click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                        show_default=True, help="output format")(fn)


def datapath_config(node: str, bpf_root: str) -> DatapathConfig:
    try:
        return DatapathConfig(node=node, bpf_root=bpf_root)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def open_map(map_cls, node: str, bpf_root: str):
    """Opens a pinned map, turning the expected failures into one-line CLI errors."""
    config = datapath_config(node, bpf_root)
    try:
        return map_cls(config.pin_dir)
    except (MapNotFound, MapLayoutError) as e:
        raise click.ClickException(str(e)) from None
    except PermissionError:
        raise click.ClickException(f"permission denied opening {config.pin_dir}: run as root") from None


def emit(output: str, rows: list[dict], columns: Sequence[tuple[str, str | Callable]],
         empty: str = "") -> None:
    """Prints rows as JSON or as an aligned table; columns are (header, key or function)."""
    if output == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows and empty:
        click.echo(empty)
        return
    table = [[h for h, _ in columns]]
    for row in rows:
        table.append([str(get(row) if callable(get) else row.get(get, "")) for _, get in columns])
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for r in table:
        click.echo("   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
