"""`ciliumpy agent`: run the node agent in the foreground."""

from __future__ import annotations

import logging

import click

from cilium_py import defaults
from cilium_py.agent.daemon import Agent, AgentConfig, AgentError
from cilium_py.agent.hubble import HubbleConfig
from cilium_py.agent.paths import RunPaths
from cilium_py.hubble.ring import DEFAULT_CAPACITY, MAX_CAPACITY
from cilium_py.datapath.config import (AGGREGATION_LEVELS, EVENT_BACKENDS, LB_ACCELERATIONS,
                                       NO_BACKEND_RESPONSES, DatapathConfig)
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


def _socket_lb_options(cgroup_root: str, bpf_lb_sock: bool | None) -> dict:
    """--cgroup-root checked before anything is loaded: a cgroup v2 directory, never a root."""
    from cilium_py.datapath.attach import CgroupError, check_cgroup_root

    if bpf_lb_sock and not cgroup_root:
        raise click.BadParameter("needs --cgroup-root: the cgroup the hooks attach to",
                                 param_hint="--bpf-lb-sock")
    if cgroup_root:
        try:
            check_cgroup_root(cgroup_root)
        except CgroupError as e:
            raise click.BadParameter(str(e), param_hint="--cgroup-root") from None
    return {"cgroup_root": cgroup_root, "bpf_lb_sock": bpf_lb_sock is not False}


def _kubernetes_mode(manifests: str, kubeconfig: str) -> bool:
    """Kubernetes mode with a kubeconfig, or in a pod (the in-cluster configuration) unless a
    manifests directory is the source."""
    import os

    if manifests and kubeconfig:
        raise click.BadParameter("give either --manifests or an API server, not both",
                                 param_hint="--k8s-kubeconfig-path")
    return bool(kubeconfig) or (not manifests and bool(os.environ.get("KUBERNETES_SERVICE_HOST")))


def _lab_listeners(paths):
    """In lab mode each pod gets a listener standing in for its containers."""
    from cilium_py.lab.listeners import LabListeners

    return LabListeners(paths.listeners)


def _lb_options(fn):
    """The services (kube-proxy replacement) options, named like Cilium's."""
    from cilium_py.agent.services.maglev import DEFAULT_SEED, MAGLEV_PRIMES

    options = [
        click.option("--bpf-lb-algorithm", type=click.Choice(["random", "maglev"]), default="random",
                     show_default=True, help="backend selection for services without the "
                                             "service.cilium.io/lb-algorithm annotation"),
        click.option("--bpf-lb-maglev-table-size", type=int, default=16381, show_default=True,
                     help=f"entries of each Maglev table: one of {', '.join(map(str, MAGLEV_PRIMES))}"),
        click.option("--bpf-lb-maglev-hash-seed", default=DEFAULT_SEED, show_default=True,
                     help="12 bytes, base64: the Maglev seed every node must share"),
        click.option("--node-port-range", default="30000-32767", show_default=True,
                     help="nodePorts are allocated and accepted in this range"),
        click.option("--bpf-lb-map-max", type=click.IntRange(1, 1 << 24), default=65536, show_default=True,
                     help="entries of the service, backend and reverse-NAT maps"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _lb_config(bpf_lb_algorithm, bpf_lb_maglev_table_size, bpf_lb_maglev_hash_seed, node_port_range,
               bpf_lb_map_max) -> tuple[dict, dict]:
    """(DatapathConfig fields, AgentConfig fields), each checked against the flag it came from."""
    from cilium_py.agent.services.config import parse_node_port_range
    from cilium_py.agent.services.maglev import MaglevError, check_table_size, murmur_seed

    try:
        check_table_size(bpf_lb_maglev_table_size)
    except MaglevError as e:
        raise click.BadParameter(str(e), param_hint="--bpf-lb-maglev-table-size") from None
    try:
        murmur_seed(bpf_lb_maglev_hash_seed)
    except MaglevError as e:
        raise click.BadParameter(str(e), param_hint="--bpf-lb-maglev-hash-seed") from None
    try:
        ports = parse_node_port_range(node_port_range)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--node-port-range") from None
    return ({"lb_algorithm": bpf_lb_algorithm, "maglev_table_size": bpf_lb_maglev_table_size,
             "lb_map_max": bpf_lb_map_max},
            {"node_port_range": ports, "maglev_hash_seed": bpf_lb_maglev_hash_seed})


@click.command(context_settings={"auto_envvar_prefix": "CILIUMPY_AGENT", "show_default": True})
@click.option("--config", type=click.Path(dir_okay=False), callback=load_config_file, is_eager=True,
              expose_value=False, help="YAML or JSON file of options (flags and CILIUMPY_AGENT_* win)")
@click.option("--node", envvar="CILIUMPY_NODE", default=defaults.NODE_NAME, show_default=True)
@click.option("--bpf-root", envvar="CILIUMPY_BPF_ROOT", default=defaults.BPF_ROOT, show_default=True)
@click.option("--run-dir", envvar="CILIUMPY_RUN_DIR", default=defaults.RUN_DIR, show_default=True)
@click.option("--node-netns", required=True, help="network namespace of the node's devices")
@click.option("--device", "devices", multiple=True, help="node device: XDP prefilter, NodePort/LoadBalancer")
@click.option("--xdp-mode", type=click.Choice(["native", "generic"]), default="native", show_default=True)
@click.option("--node-ip", "node_ips", multiple=True, help="an address of the node (reserved:host)")
@click.option("--bpf-ct-global-tcp-max", type=int, default=defaults.CT_GLOBAL_TCP_MAX, show_default=True)
@click.option("--bpf-ct-global-any-max", type=int, default=defaults.CT_GLOBAL_ANY_MAX, show_default=True)
@click.option("--bpf-ct-timeout-regular-tcp", type=int, default=defaults.CT_TIMEOUT_REGULAR_TCP, show_default=True)
@click.option("--bpf-ct-timeout-regular-tcp-syn", type=int, default=defaults.CT_TIMEOUT_REGULAR_TCP_SYN, show_default=True)
@click.option("--bpf-ct-timeout-regular-tcp-fin", type=int, default=defaults.CT_TIMEOUT_REGULAR_TCP_FIN, show_default=True)
@click.option("--bpf-ct-timeout-regular-any", type=int, default=defaults.CT_TIMEOUT_REGULAR_ANY, show_default=True)
@click.option("--bpf-policy-map-max", type=click.IntRange(16, 1 << 20), default=defaults.POLICY_MAP_MAX,
              show_default=True, help="policy entries one endpoint may have; an endpoint whose policy "
                                      "needs more stays on its previous policy (or denies all) and is "
                                      "reported not-ready")
@click.option("--conntrack-gc-interval", type=float, default=defaults.CT_GC_INTERVAL, show_default=True)
@click.option("--events", type=click.Choice(EVENT_BACKENDS), default="ringbuf", show_default=True,
              help="event transport: BPF ring buffer or perf buffer")
@click.option("--monitor-aggregation", type=click.Choice(list(AGGREGATION_LEVELS)), default="medium",
              show_default=True)
@click.option("--manifests", type=click.Path(file_okay=False), default="",
              help="directory of Kubernetes YAML to enforce (the manifests source)")
@click.option("--k8s-kubeconfig-path", default="",
              help="kubeconfig of the API server: Kubernetes mode (the API server instead of "
                   "--manifests; in a pod, the service account's in-cluster configuration is used)")
@click.option("--k8s-node-name", envvar="K8S_NODE_NAME", default="",
              help="this node's name in Kubernetes  [default: --node; env K8S_NODE_NAME]")
@click.option("--pod-cidr", default="",
              help="this node's pod CIDR (manifests mode; in Kubernetes mode it overrides the "
                   "operator's and is written to the CiliumNode)")
@click.option("--router-ip", default="",
              help="the pods' gateway on cilium_host  [Kubernetes mode: the pod CIDR's first address]")
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
@click.option("--cgroup-root", default="",
              help="cgroup v2 directory for the socket-LB hooks (empty: socket LB off; a root "
                   "cgroup is refused)")
@click.option("--bpf-lb-sock/--no-bpf-lb-sock", default=None,
              help="socket load balancing on the cgroup root  [default: on with --cgroup-root]")
@click.option("--service-no-backend-response", type=click.Choice(NO_BACKEND_RESPONSES), default="reject",
              show_default=True, help="a service frontend without backends: ICMP unreachable, or drop")
@click.option("--bpf-lb-acceleration", type=click.Choice(LB_ACCELERATIONS), default="disabled",
              show_default=True, help="native: NodePort/LoadBalancer translated in XDP as well as tc")
@_lb_options
@click.option("-v", "--verbose", is_flag=True)
def agent(node, bpf_root, run_dir, node_netns, devices, xdp_mode, node_ips, bpf_ct_global_tcp_max,
          bpf_ct_global_any_max, bpf_ct_timeout_regular_tcp, bpf_ct_timeout_regular_tcp_syn,
          bpf_ct_timeout_regular_tcp_fin, bpf_ct_timeout_regular_any, bpf_policy_map_max,
          conntrack_gc_interval, events, monitor_aggregation, manifests, k8s_kubeconfig_path,
          k8s_node_name, pod_cidr, router_ip, state_dir, lab,
          enable_hubble, hubble_socket_path, hubble_listen_address, hubble_event_buffer_capacity,
          hubble_metrics, hubble_metrics_server, prometheus_serve_addr, cgroup_root, bpf_lb_sock,
          service_no_backend_response, bpf_lb_acceleration, verbose, **lb_options):
    """Run the node agent: load the datapath and keep it running.

    Every option can also come from the environment (CILIUMPY_AGENT_<OPTION>, e.g.
    CILIUMPY_AGENT_BPF_CT_GLOBAL_TCP_MAX) or from --config FILE."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lb_datapath, lb_agent = _lb_config(**lb_options)
    kubernetes = _kubernetes_mode(manifests, k8s_kubeconfig_path)
    datapath = DatapathConfig(
        node=node, bpf_root=bpf_root, ct_global_tcp_max=bpf_ct_global_tcp_max,
        ct_global_any_max=bpf_ct_global_any_max, ct_timeout_tcp=bpf_ct_timeout_regular_tcp,
        ct_timeout_syn=bpf_ct_timeout_regular_tcp_syn, ct_timeout_fin=bpf_ct_timeout_regular_tcp_fin,
        ct_timeout_any=bpf_ct_timeout_regular_any, events=events,
        monitor_aggregation=monitor_aggregation, service_no_backend_response=service_no_backend_response,
        lb_acceleration=bpf_lb_acceleration, policy_map_max=bpf_policy_map_max, **lb_datapath)
    config = AgentConfig(datapath=datapath, node_netns=node_netns, devices=tuple(devices),
                         xdp_mode=xdp_mode, run_dir=run_dir, gc_interval=conntrack_gc_interval,
                         node_ips=tuple(node_ips), manifests=manifests, kubernetes=kubernetes,
                         kubeconfig=k8s_kubeconfig_path, k8s_node_name=k8s_node_name, pod_cidr=pod_cidr,
                         router_ip=router_ip, state_dir=state_dir, lab=lab,
                         endpoint_hooks=_lab_listeners if lab else None,
                         hubble=_hubble_config(enable_hubble, hubble_socket_path or
                                               RunPaths(run_dir, node).hubble_socket,
                                               hubble_listen_address, hubble_event_buffer_capacity,
                                               hubble_metrics, hubble_metrics_server),
                         prometheus_address=prometheus_serve_addr,
                         **_socket_lb_options(cgroup_root, bpf_lb_sock), **lb_agent)
    try:
        Agent(config).run_forever()
    except (AgentError, DatapathError) as e:
        raise click.ClickException(str(e)) from None
