"""The `hubble` command: flows, status and nodes from a Hubble Observer server.

Thin click commands: flag translation lives in cilium_py.cli.hubble_filterflags, output in
cilium_py.cli.hubble_printer. This module only dials, calls and turns failures into one-line
errors (click exceptions: exit 1 for runtime errors, 2 for bad flags).

Server address: `--server`, else $HUBBLE_SERVER, else DEFAULT_SERVER (the agent's socket).
Accepted forms: unix:///abs/path, unix:/abs/path, /abs/path (all a unix socket), host:port,
[v6addr]:port and :port (localhost).
"""

from __future__ import annotations

import os
import queue
import socket
import stat
import sys
import threading
from collections import Counter

import click
import grpc
from google.protobuf import json_format

from cilium_py import __version__
from cilium_py.cli import hubble_filterflags as filterflags
from cilium_py.cli import hubble_printer as printer
from cilium_py.hubble.api.observer import observer_pb2 as O
from cilium_py.hubble.api.observer import observer_pb2_grpc

DEFAULT_SERVER = "unix:///var/run/ciliumpy/hubble.sock"
ORDER_KEY = "hubble.flag_order"
# `-o table --follow`: rows are held back so a burst shares column widths; they are
# printed when the stream has been quiet this long, or TABLE_FOLLOW_ROWS are waiting.
TABLE_IDLE_FLUSH_SECONDS = 0.5
TABLE_FOLLOW_ROWS = 100


# -- server address and connection ---------------------------------------------------------

def resolve_server(address: str) -> str:
    """A --server value -> a gRPC target (unix:///abs/path or host:port); ValueError if bad."""
    a = address.strip()
    forms = "expected unix:///abs/path, unix:/abs/path, /abs/path, host:port or :port"
    if a.startswith("unix:") or a.startswith("/"):
        path = a[len("unix://"):] if a.startswith("unix://") else a.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{address!r}: unix socket paths must be absolute; {forms}")
        return "unix://" + path
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address!r}: no valid port; {forms}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"{address!r}: write IPv6 addresses in brackets, e.g. [::1]:4245")
    return f"{host or 'localhost'}:{port}"


def _server_callback(ctx, param, value):
    try:
        return resolve_server(value)
    except ValueError as e:
        raise click.BadParameter(f"{e} (from --server or HUBBLE_SERVER)") from None


def _timeout_callback(ctx, param, value):
    try:
        return filterflags.parse_duration(param.name.replace("_", "-"), value) / 1e9
    except filterflags.FlagError as e:
        raise click.BadParameter(str(e)) from None


_HINT = "Is the agent running with Hubble enabled? Point --server (or HUBBLE_SERVER) at it."


def _cannot_connect(target: str, why: str) -> click.ClickException:
    return click.ClickException(f"cannot connect to the Hubble server at {target}: {why}. {_HINT}")


def _connect_once(target: str, timeout: float) -> None:
    if target.startswith("unix://"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(target[len("unix://"):])
    else:
        host, _, port = target.rpartition(":")
        # create_connection tries every address of the name, as gRPC does
        socket.create_connection((host.strip("[]"), int(port)), timeout).close()


def probe(target: str, timeout: float) -> None:
    """Connects once with a plain socket, to fail fast and say why.

    gRPC would only report "failed to connect to all addresses" or time out; and its own
    readiness wait (channel_ready_future) makes every channel.close() stall for 0.2 s.
    """
    unix = target.startswith("unix://")
    if unix:
        path = target[len("unix://"):]
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise _cannot_connect(target, f"{path} does not exist") from None
        except PermissionError:
            raise _cannot_connect(target, f"permission denied on {path} (run as root?)") from None
        if not stat.S_ISSOCK(mode):
            raise _cannot_connect(target, f"{path} is not a socket")
    try:
        _connect_once(target, timeout)
    except socket.gaierror as e:
        raise _cannot_connect(target, f"cannot resolve the host name: {e.strerror}") from None
    except PermissionError:
        raise _cannot_connect(target, "permission denied (run as root?)") from None
    except ConnectionRefusedError:
        why = "nothing is listening (a stale socket?)" if unix else "connection refused"
        raise _cannot_connect(target, why) from None
    except TimeoutError:
        raise _cannot_connect(target, f"no connection within {timeout:g}s (--timeout)") from None
    except OSError as e:
        raise _cannot_connect(target, e.strerror or str(e)) from None


def dial(target: str, timeout: float) -> grpc.Channel:
    probe(target, timeout)
    return grpc.insecure_channel(target)


def rpc_error(e: grpc.RpcError, target: str) -> click.ClickException:
    """A failed call -> the server's own message, which already says what was wrong."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return click.ClickException(details or "the server rejected the request")
    if code == grpc.StatusCode.UNAVAILABLE:
        return click.ClickException(f"the Hubble server at {target} is unavailable: {details}. {_HINT}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return click.ClickException(f"the server at {target} does not implement this call: {details}")
    return click.ClickException(f"{code.name.lower()}: {details}" if details else code.name.lower())


def server_options(fn):
    fn = click.option("--timeout", default="5s", show_default=True, callback=_timeout_callback,
                      metavar="DURATION", help="how long to wait for the connection")(fn)
    fn = click.option("--server", envvar="HUBBLE_SERVER", default=DEFAULT_SERVER, show_default=True,
                      callback=_server_callback, metavar="ADDRESS",
                      help="unix:///path, /path, host:port or :port; $HUBBLE_SERVER overrides "
                           "the default")(fn)
    return fn


def _unary(method, request, target: str, timeout: float):
    try:
        return method(request, timeout=timeout)
    except grpc.RpcError as e:
        raise rpc_error(e, target) from None


def _json(message) -> str:
    return json_format.MessageToJson(message, always_print_fields_with_no_presence=True)


# -- observe --------------------------------------------------------------------------------

class FilterOption(click.Option):
    """A filter flag; `filter_flag` is its filterflags name ("from-pod")."""

    def __init__(self, *args, filter_flag: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.filter_flag = filter_flag


class ObserveCommand(click.Command):
    """Records every option occurrence in command-line order into ctx.meta[ORDER_KEY].

    `--not` negates the flag after it, but click hands over values grouped by option.
    click's own parser reports the occurrence order (one entry per occurrence) and the raw
    values of repeatable options in order, so parsing once more here gives the exact
    interleaving without a second, hand-written parser that could disagree with click.
    """

    def parse_args(self, ctx, args):
        if not ctx.resilient_parsing:
            try:
                opts, _, order = self.make_parser(ctx).parse_args(args=list(args))
            except click.UsageError:
                opts, order = {}, []  # the real parse below reports it
            ctx.meta[ORDER_KEY] = _ordered_flags(opts, order)
        return super().parse_args(ctx, args)


def _ordered_flags(opts: dict, order: list) -> list[tuple[str, str | None]]:
    used: Counter = Counter()
    out = []
    for param in order:
        if isinstance(param, FilterOption):
            if param.is_flag:
                out.append((param.filter_flag, None))
            else:
                out.append((param.filter_flag, opts[param.name][used[param.name]]))
                used[param.name] += 1
        elif isinstance(param, click.Option):
            # kept so that `--not --follow --pod a` is caught instead of skipping --follow
            out.append((max(param.opts, key=len).lstrip("-"), None))
    return out


def filter_options(fn):
    # reversed: decorators apply bottom-up, and --help should list them in table order
    for flag in reversed(filterflags.FILTER_FLAGS):
        decls = [f"--{flag.name}"] + ([f"-{flag.short}"] if flag.short else [])
        dest = "filter_" + flag.name.replace("-", "_")
        if flag.metavar is None:
            fn = click.option(*decls, dest, cls=FilterOption, filter_flag=flag.name, is_flag=True,
                              help=flag.help)(fn)
        else:
            fn = click.option(*decls, dest, cls=FilterOption, filter_flag=flag.name, multiple=True,
                              metavar=flag.metavar, help=flag.help)(fn)
    return fn


def _responses(call, idle: float | None):
    """The stream's responses; with `idle`, also None whenever it was quiet that long.

    The stream is read on a helper thread so the main thread can wake up to flush a
    table; Ctrl-C still reaches the main thread, which is waiting on the queue.
    """
    if idle is None:
        yield from call
        return
    items: queue.SimpleQueue = queue.SimpleQueue()
    end = object()

    def pump():
        try:
            for resp in call:
                items.put(resp)
            items.put(end)
        except grpc.RpcError as e:
            items.put(e)

    threading.Thread(target=pump, name="hubble-stream", daemon=True).start()
    while True:
        try:
            item = items.get(timeout=idle)
        except queue.Empty:
            yield None
            continue
        if item is end:
            return
        if isinstance(item, grpc.RpcError):
            raise item
        yield item


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush
    does not print a second BrokenPipeError (the recipe from Python's signal docs)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (e.g. under CliRunner): nothing will flush to the pipe


@click.group()
@click.version_option(__version__, prog_name="hubble")
def cli():
    """hubble: observe the flows of a ciliumpy node (Hubble's Observer API)."""


@cli.command(cls=ObserveCommand)
@click.option("-f", "--follow", is_flag=True, help="keep printing new flows as they arrive")
@click.option("--last", type=click.IntRange(min=1), metavar="N",
              help="the last N flows (default 20 when no other selection flag is given)")
@click.option("--first", type=click.IntRange(min=1), metavar="N", help="the oldest N flows in the ring")
@click.option("--all", "all_flows", is_flag=True, help="every flow in the ring")
@click.option("--since", metavar="DURATION|TIME", help="flows since 5m, 1h30m ago or an RFC3339 time")
@click.option("--until", metavar="DURATION|TIME", help="flows until 5m ago or an RFC3339 time")
@filter_options
@click.option("--allowlist", multiple=True, metavar="JSON",
              help='a FlowFilter as JSON, ORed with the flag filters, e.g. \'{"source_pod":["shop/"]}\'')
@click.option("--denylist", multiple=True, metavar="JSON", help="a FlowFilter as JSON for the blacklist")
@click.option("--print-raw-filters", is_flag=True, help="print the filters the flags make, and exit")
@click.option("-o", "--output", type=click.Choice(printer.FORMATS), default="compact", show_default=True,
              help="output format")
@click.option("--print-node-name", is_flag=True, help="show the node each flow was seen on")
@click.option("--print-policy-names", is_flag=True, help="show the policies that allowed or denied flows")
@server_options
@click.pass_context
def observe(ctx, follow, last, first, all_flows, since, until, allowlist, denylist, print_raw_filters,
            output, print_node_name, print_policy_names, server, timeout, **_filter_flags):
    """Print flows, the last 20 by default.

    Filter flags can be repeated: values of one flag are ORed (--pod a --pod b), different
    flags ANDed. --pod, --namespace, --ip, --label, --identity, --port and --service
    match either side, their --from-/--to- forms one side. --not puts the next filter
    flag into the blacklist. Selection: --follow alone prints only new flows;
    --since/--until alone print every flow in that window.
    """
    try:
        whitelist, blacklist = filterflags.build_filters(ctx.meta.get(ORDER_KEY, []))
        whitelist += filterflags.parse_raw_filters("allowlist", allowlist)
        blacklist += filterflags.parse_raw_filters("denylist", denylist)
        request = filterflags.build_request(whitelist, blacklist, last=last, first=first,
                                            all_flows=all_flows, follow=follow, since=since, until=until)
    except filterflags.FlagError as e:
        raise click.UsageError(str(e), ctx) from None  # exit 2 with the usage line, like click
    if print_raw_filters:
        click.echo(filterflags.format_raw_filters(request.whitelist, request.blacklist))
        return

    table_follow = output == "table" and follow
    out = printer.FlowPrinter(output, sys.stdout, sys.stderr, print_node_name=print_node_name,
                              print_policy_names=print_policy_names,
                              flush_every=TABLE_FOLLOW_ROWS if table_follow else None,
                              line_buffered=follow)
    channel = dial(server, timeout)
    call = observer_pb2_grpc.ObserverStub(channel).GetFlows(request)
    try:
        for resp in _responses(call, TABLE_IDLE_FLUSH_SECONDS if table_follow else None):
            if resp is None:
                out.flush()
            else:
                out.write(resp)
        out.close()
    except KeyboardInterrupt:
        # Ctrl-C is how a follow ends: not an error, and no traceback.
        call.cancel()
        try:
            out.close()
        except BrokenPipeError:
            _silence_stdout()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, like a well-behaved filter.
        call.cancel()
        _silence_stdout()
    except grpc.RpcError as e:
        try:
            out.close()  # what arrived before the error is still worth seeing
        except BrokenPipeError:
            _silence_stdout()
        raise rpc_error(e, server) from None
    finally:
        channel.close()


# -- status and list nodes ------------------------------------------------------------------

_request_timeout = click.option("--request-timeout", default="12s", show_default=True,
                                callback=_timeout_callback, metavar="DURATION",
                                help="how long to wait for the answer")


def _ask(server: str, timeout: float, request_timeout: float, rpc: str, request):
    """One unary Observer call on a fresh channel."""
    channel = dial(server, timeout)
    try:
        return _unary(getattr(observer_pb2_grpc.ObserverStub(channel), rpc), request, server,
                      request_timeout)
    finally:
        channel.close()


@cli.command()
@click.option("-o", "--output", type=click.Choice(["compact", "json"]), default="compact",
              show_default=True, help="output format")
@server_options
@_request_timeout
def status(output, server, timeout, request_timeout):
    """Server health, flow ring occupancy and flow rate."""
    resp = _ask(server, timeout, request_timeout, "ServerStatus", O.ServerStatusRequest())
    click.echo(_json(resp) if output == "json" else printer.status_text(resp, server))


@cli.group("list")
def list_():
    """List what the server knows about."""


@list_.command("nodes")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="output format")
@server_options
@_request_timeout
def list_nodes(output, server, timeout, request_timeout):
    """The nodes behind the server (for an agent: itself)."""
    resp = _ask(server, timeout, request_timeout, "GetNodes", O.GetNodesRequest())
    click.echo(_json(resp) if output == "json" else printer.nodes_table(resp))


if __name__ == "__main__":
    cli()
