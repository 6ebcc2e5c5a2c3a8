"""The agent, as far as the datapath needs one: compile and load once, put the new programs
on every existing endpoint and node device (replacing the old ones in place), collect
expired conntrack entries, and relay events to `ciliumpy monitor`.

Stopping the agent leaves programs attached and maps pinned: established connections and
enforcement continue while no agent runs, and the next agent picks the same maps up.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from cilium_py import defaults
from cilium_py.agent.api import APIServer
from cilium_py.agent.backend import kernel_backend
from cilium_py.agent.controller import ControlPlane, ControlPlaneConfig
from cilium_py.agent.ctgc import ConntrackGC
from cilium_py.agent.endpoints import EndpointManager
from cilium_py.agent.hubble import Hubble, HubbleConfig
from cilium_py.agent.ipcache import SOURCE_LOCAL, IPCache
from cilium_py.agent.metrics import AgentMetrics, serve
from cilium_py.agent.monitor_server import MonitorServer
from cilium_py.agent.nodeview import AgentNodeView
from cilium_py.agent.paths import RunPaths
from cilium_py.agent.services.config import DEFAULT_NODE_PORT_RANGE
from cilium_py.agent.services.maglev import DEFAULT_SEED
from cilium_py.agent.services.wiring import kpr_status, start_services
from cilium_py.agent.sources.manifests import ManifestsSource
from cilium_py.agent.store import Store
from cilium_py.datapath import attach, loader, netns, programs
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.endpoints import ENDPOINT_F_HOST, EndpointMap
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.datapath.monitor import EventDecodeError, EventReader, decode
from cilium_py.hubble.metrics import HubbleMetrics
from cilium_py.signals import run_until_signalled
from cilium_py.vocab import IDENTITY_HOST

log = logging.getLogger(__name__)


class AgentError(RuntimeError):
    """The agent cannot start; the message says what is missing."""


@dataclass
class AgentConfig:
    datapath: DatapathConfig = field(default_factory=DatapathConfig)
    node_netns: str = ""           # namespace holding the node's devices and endpoint veths
    devices: tuple[str, ...] = ()  # node devices: XDP prefilter (+ NodePort), tc NodePort
    xdp_mode: str = "native"
    run_dir: str = defaults.RUN_DIR
    gc_interval: float = defaults.CT_GC_INTERVAL
    node_ips: tuple[str, ...] = ()  # the node's own addresses: reserved:host in the ipcache
    manifests: str = ""             # directory of YAML the manifests source watches
    # Kubernetes mode (instead of the manifests source): the API server from `kubeconfig`,
    # or in-cluster when empty; this node's name there (default: the datapath's node).
    kubernetes: bool = False
    kubeconfig: str = ""
    k8s_node_name: str = ""
    pod_cidr: str = ""              # this node's pod addresses (Kubernetes mode: from its CiliumNode)
    router_ip: str = ""             # the pods' gateway, on cilium_host (Kubernetes mode: from the pod CIDR)
    state_dir: str = ""             # identities, IPAM; survives restarts and reboots
    lab: bool = False               # lab mode: pods without nodeName are ours
    # What runs beside each endpoint, given the run paths (the lab's listeners, passed in by
    # `ciliumpy agent --lab`: the agent itself never imports the lab).
    endpoint_hooks: object = None   # Callable[[RunPaths], EndpointHooks] | None
    hubble: HubbleConfig = field(default_factory=HubbleConfig)
    prometheus_address: str = ""    # where the agent's own metrics are served ("" = off)
    # Socket load balancing (bpf_sock.c): the cgroup v2 directory its hooks attach to ("" =
    # off; never a root cgroup), and whether they are on there (--bpf-lb-sock).
    cgroup_root: str = ""
    bpf_lb_sock: bool = True
    # Services (kube-proxy replacement): nodePorts allocated and accepted in this range;
    # the Maglev seed every node must share (--node-port-range, --bpf-lb-maglev-hash-seed).
    node_port_range: tuple[int, int] = DEFAULT_NODE_PORT_RANGE
    maglev_hash_seed: str = DEFAULT_SEED

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.run_dir, self.datapath.node)


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.loaded = None
        self.gc: ConntrackGC | None = None
        self.reader: EventReader | None = None
        self.monitor = MonitorServer(config.paths.monitor_socket)
        self.start_seconds = 0.0
        self.reattached = 0
        self.started_at = time.time()
        self.store = None
        self.source = None
        self.control = None
        self.services = None
        self.api = APIServer(config.paths.api_socket, self)
        self.hubble: Hubble | None = None
        self.node_view: AgentNodeView | None = None  # what Hubble knows of this node
        self.metrics = None
        self._metrics_servers = []
        self.metrics_addresses: dict[str, str] = {}
        self.ipcache: IPCache | None = None  # the process's one ipcache writer
        self.kubernetes = None               # Kubernetes mode (agent/k8s/wiring.py)

    def start(self) -> None:
        cfg = self.config
        if not cfg.node_netns or not netns.exists(cfg.node_netns):
            raise AgentError(f"node namespace {cfg.node_netns!r} does not exist; the agent only "
                             f"attaches programs inside a node namespace it is given")
        if netns.is_root(cfg.node_netns):
            raise AgentError(f"node namespace {cfg.node_netns!r} is the machine's root network "
                             f"namespace; the agent never attaches programs there")
        started = time.monotonic()
        if os.path.exists(cfg.paths.ready_file):
            os.unlink(cfg.paths.ready_file)
        self.loaded = loader.load(cfg.datapath)
        self._register_node_addresses()
        manager = EndpointManager(cfg.datapath, cfg.node_netns)
        try:
            self.reattached = manager.reattach_all(self.loaded.prog_fds)
        finally:
            manager.close()
        self._attach_devices()
        self._attach_socket_lb()
        self.gc = ConntrackGC(cfg.datapath.pin_dir, cfg.gc_interval)
        self.gc.start()
        self.monitor.start()
        if cfg.kubernetes:
            self._start_kubernetes()
        elif cfg.manifests:
            self._start_control_plane()
        try:
            self._start_observability()
        except OSError as e:  # a listen address in use: say which, not a traceback
            raise AgentError(str(e)) from None
        self.reader = EventReader(self.loaded, on_batch=self._on_events)
        if self.hubble is not None:
            self.hubble.set_perf_lost_source(lambda: self.reader.perf_lost)
        self.reader.start()
        self.api.start()
        self.start_seconds = time.monotonic() - started
        with open(cfg.paths.ready_file, "w") as f:
            f.write(f"{os.getpid()}\n")
        log.info("agent for node %s ready in %.2fs (%d endpoints re-attached)",
                 cfg.datapath.node, self.start_seconds, self.reattached)

    def _start_control_plane(self) -> None:
        cfg = self.config
        missing = [name for name in ("pod_cidr", "router_ip", "state_dir") if not getattr(cfg, name)]
        if missing:
            raise AgentError(f"manifests mode needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
        self.store = Store()
        self.control = ControlPlane(ControlPlaneConfig(
            datapath=cfg.datapath, node_netns=cfg.node_netns, router_ip=cfg.router_ip,
            pod_cidr=cfg.pod_cidr, state_dir=cfg.state_dir, lab=cfg.lab, node_ips=cfg.node_ips,
            policy_map_max=cfg.datapath.policy_map_max),
            self.store, kernel_backend(cfg.datapath, cfg.node_netns, cfg.router_ip, self.ipcache),
            hooks=self._endpoint_hooks())
        self.source = ManifestsSource(cfg.manifests, self.store)
        self.control.source_errors_fn = lambda: self.source.errors
        self.source.sync_once()
        self.control.start()
        self.services = start_services(cfg, self.store, self.control)
        self.source.start()

    def _start_kubernetes(self) -> None:
        """Kubernetes mode: the source, identities, CiliumEndpoints, policy status and the
        CiliumNode (agent/k8s/); services as in manifests mode, from the same store."""
        from cilium_py.agent.k8s.node import NodeRegistrationError
        from cilium_py.agent.k8s.wiring import KubernetesMode
        from cilium_py.k8s.client import ApiError, Kube

        cfg = self.config
        if cfg.manifests:
            raise AgentError("--manifests and Kubernetes mode exclude each other: give one source")
        if not cfg.state_dir:
            raise AgentError("Kubernetes mode needs --state-dir (CIDR identities and IP allocations)")
        try:
            kube = Kube(cfg.kubeconfig or None)
        except Exception as e:  # noqa: BLE001 - the client's configuration errors vary
            where = cfg.kubeconfig or "the in-cluster service account"
            raise AgentError(f"cannot configure the Kubernetes client from {where}: {e}") from None
        self.kubernetes = KubernetesMode(
            kube, ControlPlaneConfig(
                datapath=cfg.datapath, node_netns=cfg.node_netns, router_ip=cfg.router_ip,
                pod_cidr=cfg.pod_cidr, state_dir=cfg.state_dir, lab=cfg.lab, node_ips=cfg.node_ips,
                policy_map_max=cfg.datapath.policy_map_max),
            node_name=cfg.k8s_node_name or cfg.datapath.node,
            backend_for=lambda router_ip: kernel_backend(cfg.datapath, cfg.node_netns, router_ip, self.ipcache),
            hooks=self._endpoint_hooks())
        try:
            self.control = self.kubernetes.start()
        except (ApiError, NodeRegistrationError) as e:
            raise AgentError(f"Kubernetes mode: {e}") from None
        self.store, self.source = self.kubernetes.store, self.kubernetes.source
        self.services = start_services(cfg, self.store, self.control)

    def _endpoint_hooks(self):
        factory = self.config.endpoint_hooks
        return factory(self.config.paths) if factory is not None else None

    def _start_observability(self) -> None:
        """Prometheus metrics and Hubble. The agent's policy-verdict counter and the Hubble
        flow metrics are fed by parsed flows, so they count only while Hubble is enabled."""
        cfg = self.config
        observers = []
        if cfg.prometheus_address:
            self.metrics = AgentMetrics(
                cfg.datapath.pin_dir,
                endpoint_count_fn=lambda: len(self.control.endpoints) if self.control else 0,
                endpoint_states_fn=lambda: self.control.endpoint_states() if self.control else {},
                lost_fn=self._lost_counts)
            observers.append(self.metrics.observe_flow)
            self._serve_metrics("agent", cfg.prometheus_address, self.metrics.registry)
        if cfg.hubble.metrics:
            flow_metrics = HubbleMetrics(cfg.hubble.metrics)
            observers.append(flow_metrics.process)
            self._serve_metrics("hubble", cfg.hubble.metrics_address, flow_metrics.registry)
        if cfg.hubble.enabled:
            self.node_view = AgentNodeView.over_pinned_ipcache(
                cfg.datapath.pin_dir, control=self.control, services=self.services)
            self.hubble = Hubble(cfg.hubble, cfg.datapath.node, cfg.datapath.pin_dir,
                                 node_view=self.node_view, flow_observers=observers)
            self.hubble.start()

    def _serve_metrics(self, name: str, address: str, registry) -> None:
        try:
            server = serve(address, registry)
        except (OSError, ValueError) as e:
            raise AgentError(f"cannot serve {name} metrics on {address}: {e}") from None
        self._metrics_servers.append(server)
        self.metrics_addresses[name] = f"{server.host}:{server.port}"

    def _lost_counts(self) -> dict[str, int]:
        """Losses besides the datapath's own counter: perf-reported and unparsable records."""
        return {"perf": self.reader.perf_lost if self.reader else 0,
                "parse": (self.hubble.parser.errors + self.hubble.consumer_failures
                          if self.hubble else 0)}

    def _on_events(self, records: list[bytes]) -> None:
        """Every batch the datapath produced: to Hubble, and to `ciliumpy monitor` clients
        when there are any (decoding for them is skipped otherwise)."""
        # Each consumer on its own: a failure in one must not cost the other its batch.
        if self.hubble is not None:
            try:
                self.hubble.on_batch(records)
            except Exception:  # noqa: BLE001 - counted and logged, the reader goes on
                self.hubble.consumer_failures += len(records)
                log.exception("hubble: a batch of %d events failed", len(records))
        if self.monitor.client_count:
            for raw in records:
                try:
                    self.monitor.publish(decode(raw))
                except EventDecodeError:
                    pass

    def sync_sources(self) -> int:
        """Reads the manifests now (a Kubernetes source is always current: its watches
        deliver as changes happen); returns the revision that covers what the store holds."""
        if self.kubernetes is None:
            self.source.sync_once()
        self.store.wait_idle(10.0)
        return self.control.revision

    def status(self) -> dict:
        """What `ciliumpy status` shows, in the spirit of `cilium status`."""
        from cilium_py.datapath.maps.conntrack import ConntrackTables
        from cilium_py.datapath.maps.events import EventsLostMap

        pin = self.config.datapath.pin_dir
        pressure = {}
        # The GC and Hubble keep these open for the agent's lifetime: status borrows their fds.
        with ConntrackTables.shared(pin) as tables:
            for table in (tables.tcp, tables.any):
                pressure[table.NAME] = round(len(table.items()) / table.max_entries, 4)
        control = self.control
        if control is not None and control.writer.capacity():
            pressure["ciliumpy_policy"] = round(control.writer.entry_count() / control.writer.capacity(), 4)
        with EventsLostMap.shared(pin) as lost:
            events_lost = lost.total()
        controllers = {}
        if control is not None:
            controllers = {name: vars(c) for name, c in sorted(control.controllers.items())}
        if self.services is not None:
            controllers["service-sync"] = vars(self.services.controller_status)
        if self.kubernetes is not None:
            controllers.update((name, vars(c)) for name, c in sorted(self.kubernetes.controllers.items()))
            source = f"kubernetes API server {self.kubernetes.kube.host}"
        else:
            source = "manifests directory " + self.config.manifests if self.config.manifests else "none"
        return {
            "node": self.config.datapath.node,
            "datapath": {"bpf_root": pin, "events": self.config.datapath.events,
                         "load_seconds": round(self.loaded.compile_seconds, 2) if self.loaded else None,
                         "events_lost": events_lost,
                         "events_received": self.reader.received if self.reader else 0},
            "store": {"source": source,
                      "objects": len(self.store) if self.store is not None else 0,
                      "errors": [e.to_dict() for e in self.source.errors] if self.source else []},
            "controllers": controllers,
            "endpoints": len(control.endpoints) if control else 0,
            "identities": len(control.identities.all()) if control else 0,
            "policy": {"revision": control.revision if control else 0,
                       "realized": control.realized_revision() if control else 0,
                       "failed_endpoints": control.failed_endpoints() if control else {},
                       "map_max_per_endpoint": self.config.datapath.policy_map_max},
            "map_pressure": pressure,
            "hubble": self.hubble.status() if self.hubble else {"enabled": False},
            "metrics": dict(self.metrics_addresses),
            "kube_proxy_replacement": kpr_status(self.config, self.services),
            **({"kubernetes": self.kubernetes.status()} if self.kubernetes is not None else {}),
            "uptime_seconds": round(time.time() - self.started_at, 1),
        }

    def _register_node_addresses(self) -> None:
        pin = self.config.datapath.pin_dir
        self.ipcache = IPCache(IPCacheMap.shared(pin))
        with EndpointMap.shared(pin) as endpoints:
            for ip in self.config.node_ips:
                self.ipcache.upsert(ip, IDENTITY_HOST, SOURCE_LOCAL)
                endpoints.upsert(ip, endpoint_id=0, ifindex=0, identity=IDENTITY_HOST,
                                 flags=ENDPOINT_F_HOST)

    def _attach_socket_lb(self) -> None:
        """Socket LB on the cgroup root: the new programs attached before the old ones go
        (no moment without translation); with --no-bpf-lb-sock, ours are removed there."""
        cfg = self.config
        if not cfg.cgroup_root:
            return
        names = [n for n in self.loaded.prog_fds if n in attach.SOCK_LB_PROGRAMS]
        try:
            if cfg.bpf_lb_sock:
                attach.attach_cgroup(cfg.cgroup_root, {n: self.loaded.fd(n) for n in names})
            else:
                attach.detach_cgroup(cfg.cgroup_root, names)
        except (attach.CgroupError, OSError) as e:
            raise AgentError(f"--cgroup-root {cfg.cgroup_root}: {e}") from None

    def _attach_devices(self) -> None:
        if not self.config.devices:
            return
        with netns.entered(self.config.node_netns), IPRoute() as ipr:
            for dev in self.config.devices:
                found = ipr.link_lookup(ifname=dev)
                if not found:
                    raise AgentError(f"device {dev} not found in namespace {self.config.node_netns}")
                attach.attach_xdp(ipr, found[0], self.loaded.fd(programs.DEVICE_XDP_PROGRAM), self.config.xdp_mode)
                for prog, direction in programs.DEVICE_TC_PROGRAMS:
                    attach.attach_tc(ipr, found[0], self.loaded.fd(prog), direction, prog)

    def stop(self) -> None:
        """Stops the agent's threads. Programs stay attached and maps stay pinned."""
        if os.path.exists(self.config.paths.ready_file):
            os.unlink(self.config.paths.ready_file)
        self.api.stop()
        if self.kubernetes is not None:
            self.kubernetes.stop()   # the source, the control plane's loop and the writers
        if self.source:
            self.source.stop()
        if self.services:
            self.services.stop()
            self.services.close()
        if self.control:
            self.control.stop()
            self.control.close()
        if self.reader:
            self.reader.stop()
        if self.hubble:
            self.hubble.stop()
        if self.node_view:
            self.node_view.close()
        for server in self._metrics_servers:
            server.stop()
        if self.gc:
            self.gc.stop()
        self.monitor.stop()
        if self.kubernetes is not None:
            self.kubernetes.store.close()
            self.kubernetes.kube.close()
        if self.ipcache is not None:
            self.ipcache.map.close()
            self.ipcache = None

    def run_forever(self) -> None:
        run_until_signalled(self.start, self.stop)
