"""`ciliumpy agent`: run the node agent in the foreground."""

from __future__ import annotations

import logging
import os

import click

from cilium_py import defaults
from cilium_py.agent.daemon import Agent, AgentConfig, AgentError
from cilium_py.agent.hubble import HubbleConfig
from cilium_py.hubble.ring import DEFAULT_CAPACITY, MAX_CAPACITY
from cilium_py.datapath.config import AGGREGATION_LEVELS, EVENT_BACKENDS, DatapathConfig
from cilium_py.datapath.loader import DatapathError


def load_config_file(ctx: click.Context, param, value):
    """Options from a YAML/JSON file, keyed like the flags (`bpf-ct-global-tcp-max: 1024`).
    Flags and environment variables win over the file."""
    if not value:
        return
    import yaml

    try:
        with open(value) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(f"cannot read {value}: {e}", param=param) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must map option names to values", param=param)
    known = {p.name for p in ctx.command.params}
    config = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(k.replace("_", "-") for k in config if k not in known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown option(s): {', '.join(unknown)}", param=param)
    ctx.default_map = {**(ctx.default_map or {}), **config}


def _hubble_config(enabled, socket, listen_address, capacity, metrics, metrics_server) -> HubbleConfig:
    """Checks the Hubble options before anything is loaded, naming the flag at fault."""
    from cilium_py.hubble.metrics import parse_enabled
    from cilium_py.hubble.observer import parse_listen_address

    if not 1 <= capacity <= MAX_CAPACITY:
        raise click.BadParameter(f"must be between 1 and {MAX_CAPACITY}, not {capacity}",
                                 param_hint="--hubble-event-buffer-capacity")
    for flag, address in (("--hubble-listen-address", listen_address),
                          ("--hubble-metrics-server", metrics_server)):
        if address and not address.startswith(("/", "unix:")):
            try:
                parse_listen_address(address)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint=flag) from None
    try:
        enabled_metrics = tuple(parse_enabled(metrics)) if metrics else ()
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--hubble-metrics") from None
    if enabled_metrics and not metrics_server:
        raise click.BadParameter("needs --hubble-metrics-server to serve them", param_hint="--hubble-metrics")
    return HubbleConfig(enabled=enabled, socket=socket, listen_address=listen_address,
                        ring_capacity=capacity, metrics=enabled_metrics, metrics_address=metrics_server)


@click.command(context_settings={"auto_envvar_prefix": "CILIUMPY_AGENT", "show_default": True})
@click.option("--config", type=click.Path(dir_okay=False), callback=load_config_file, is_eager=True,
              expose_value=False, help="YAML or JSON file of options (flags and CILIUMPY_AGENT_* win)")
@click.option("--node", envvar="CILIUMPY_NODE", default=defaults.NODE_NAME, show_default=True)
@click.option("--bpf-root", envvar="CILIUMPY_BPF_ROOT", default=defaults.BPF_ROOT, show_default=True)
@click.option("--run-dir", envvar="CILIUMPY_RUN_DIR", default=defaults.RUN_DIR, show_default=True)
@click.option("--node-netns", required=True, help="network namespace of the node's devices")
@click.option("--device", "devices", multiple=True, help="node device for the XDP prefilter")
@click.option("--xdp-mode", type=click.Choice(["native", "generic"]), default="native", show_default=True)
@click.option("--node-ip", "node_ips", multiple=True, help="an address of the node (reserved:host)")
@click.option("--bpf-ct-global-tcp-max", type=int, default=defaults.CT_GLOBAL_TCP_MAX, show_default=True)
@click.option("--bpf-ct-global-any-max", type=int, default=defaults.CT_GLOBAL_ANY_MAX, show_default=True)
@click.option("--bpf-ct-timeout-regular-tcp", type=int, default=defaults.CT_TIMEOUT_REGULAR_TCP, show_default=True)
@click.option("--bpf-ct-timeout-regular-tcp-syn", type=int, default=defaults.CT_TIMEOUT_REGULAR_TCP_SYN, show_default=True)
@click.option("--bpf-ct-timeout-regular-tcp-fin", type=int, default=defaults.CT_TIMEOUT_REGULAR_TCP_FIN, show_default=True)
@click.option("--bpf-ct-timeout-regular-any", type=int, default=defaults.CT_TIMEOUT_REGULAR_ANY, show_default=True)
@click.option("--conntrack-gc-interval", type=float, default=defaults.CT_GC_INTERVAL, show_default=True)
@click.option("--events", type=click.Choice(EVENT_BACKENDS), default="ringbuf", show_default=True,
              help="event transport: BPF ring buffer or perf buffer")
@click.option("--monitor-aggregation", type=click.Choice(list(AGGREGATION_LEVELS)), default="medium",
              show_default=True)
@click.option("--manifests", type=click.Path(file_okay=False), default="",
              help="directory of Kubernetes YAML to enforce (the manifests source)")
@click.option("--pod-cidr", default="", help="this node's pod CIDR (manifests mode)")
@click.option("--router-ip", default="", help="the pods' gateway on cilium_host (manifests mode)")
@click.option("--state-dir", default="", help="where identities and IP allocations persist")
@click.option("--lab", is_flag=True, help="lab mode: adopt pods without nodeName, start listeners")
@click.option("--enable-hubble/--disable-hubble", default=True, show_default=True,
              help="parse events into flows and serve the Observer API")
@click.option("--hubble-socket-path", default="",
              help="unix socket of the Observer API  [default: RUN_DIR/hubble.sock]")
@click.option("--hubble-listen-address", default="", help="also serve the Observer API on TCP, e.g. :4244")
@click.option("--hubble-event-buffer-capacity", type=int, default=DEFAULT_CAPACITY, show_default=True,
              help="flows kept in the ring")
@click.option("--hubble-metrics", default="", help="Hubble flow metrics, e.g. drop,tcp,flow,icmp,port-distribution")
@click.option("--hubble-metrics-server", default="", help="address of the Hubble flow metrics, e.g. :9965")
@click.option("--prometheus-serve-addr", default="", help="address of the agent's metrics, e.g. :9962")
@click.option("-v", "--verbose", is_flag=True)
def agent(node, bpf_root, run_dir, node_netns, devices, xdp_mode, node_ips, bpf_ct_global_tcp_max,
          bpf_ct_global_any_max, bpf_ct_timeout_regular_tcp, bpf_ct_timeout_regular_tcp_syn,
          bpf_ct_timeout_regular_tcp_fin, bpf_ct_timeout_regular_any, conntrack_gc_interval,
          events, monitor_aggregation, manifests, pod_cidr, router_ip, state_dir, lab,
          enable_hubble, hubble_socket_path, hubble_listen_address, hubble_event_buffer_capacity,
          hubble_metrics, hubble_metrics_server, prometheus_serve_addr, verbose):
    """Run the node agent: load the datapath and keep it running.

    Every option can also come from the environment (CILIUMPY_AGENT_<OPTION>, e.g.
    CILIUMPY_AGENT_BPF_CT_GLOBAL_TCP_MAX) or from --config FILE."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    datapath = DatapathConfig(
        node=node, bpf_root=bpf_root, ct_global_tcp_max=bpf_ct_global_tcp_max,
        ct_global_any_max=bpf_ct_global_any_max, ct_timeout_tcp=bpf_ct_timeout_regular_tcp,
        ct_timeout_syn=bpf_ct_timeout_regular_tcp_syn, ct_timeout_fin=bpf_ct_timeout_regular_tcp_fin,
        ct_timeout_any=bpf_ct_timeout_regular_any, events=events,
        monitor_aggregation=monitor_aggregation)
    config = AgentConfig(datapath=datapath, node_netns=node_netns, devices=tuple(devices),
                         xdp_mode=xdp_mode, run_dir=run_dir, gc_interval=conntrack_gc_interval,
                         node_ips=tuple(node_ips), manifests=manifests, pod_cidr=pod_cidr,
                         router_ip=router_ip, state_dir=state_dir, lab=lab,
                         hubble=_hubble_config(enable_hubble, hubble_socket_path or
                                               os.path.join(run_dir, "hubble.sock"),
                                               hubble_listen_address, hubble_event_buffer_capacity,
                                               hubble_metrics, hubble_metrics_server),
                         prometheus_address=prometheus_serve_addr)
    try:
        Agent(config).run_forever()
    except (AgentError, DatapathError) as e:
        raise click.ClickException(str(e)) from None
