"""The agent, as far as the datapath needs one: compile and load once, put the new programs
on every existing endpoint and node device (replacing the old ones in place), collect
expired conntrack entries, and relay events to `ciliumpy monitor`.

Stopping the agent leaves programs attached and maps pinned: established connections and
enforcement continue while no agent runs, and the next agent picks the same maps up.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

from pyroute2 import IPRoute

from cilium_py import defaults
from cilium_py.agent.ctgc import ConntrackGC
from cilium_py.agent.endpoints import EndpointManager
from cilium_py.agent.monitor_server import MonitorServer
from cilium_py.datapath import attach, loader, netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.datapath.maps.endpoints import ENDPOINT_F_HOST, EndpointMap
from cilium_py.datapath.maps.ipcache import IPCacheMap
from cilium_py.datapath.monitor import EventReader

log = logging.getLogger(__name__)

IDENTITY_HOST = 1


class AgentError(RuntimeError):
    """The agent cannot start; the message says what is missing."""


@dataclass
class AgentConfig:
    datapath: DatapathConfig = field(default_factory=DatapathConfig)
    node_netns: str = ""           # namespace holding the node's devices and endpoint veths
    devices: tuple[str, ...] = ()  # node devices that get the XDP prefilter
    xdp_mode: str = "native"
    run_dir: str = defaults.RUN_DIR
    gc_interval: float = defaults.CT_GC_INTERVAL
    node_ips: tuple[str, ...] = ()  # the node's own addresses: reserved:host in the ipcache

    @property
    def state_dir(self) -> str:
        return os.path.join(self.run_dir, self.datapath.node)

    @property
    def monitor_socket(self) -> str:
        return os.path.join(self.state_dir, "monitor.sock")

    @property
    def ready_file(self) -> str:
        return os.path.join(self.state_dir, "agent.ready")


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.loaded = None
        self.gc: ConntrackGC | None = None
        self.reader: EventReader | None = None
        self.monitor = MonitorServer(config.monitor_socket)
        self.start_seconds = 0.0
        self.reattached = 0

    def start(self) -> None:
        cfg = self.config
        if not cfg.node_netns or not netns.exists(cfg.node_netns):
            raise AgentError(f"node namespace {cfg.node_netns!r} does not exist; the agent only "
                             f"attaches programs inside a node namespace it is given")
        started = time.monotonic()
        if os.path.exists(cfg.ready_file):
            os.unlink(cfg.ready_file)
        self.loaded = loader.load(cfg.datapath)
        self._register_node_addresses()
        manager = EndpointManager(cfg.datapath, cfg.node_netns)
        try:
            self.reattached = manager.reattach_all(self.loaded.prog_fds)
        finally:
            manager.close()
        self._attach_devices()
        self.gc = ConntrackGC(cfg.datapath.pin_dir, cfg.gc_interval)
        self.gc.start()
        self.monitor.start()
        self.reader = EventReader(self.loaded, self.monitor.publish)
        self.reader.start()
        self.start_seconds = time.monotonic() - started
        with open(cfg.ready_file, "w") as f:
            f.write(f"{os.getpid()}\n")
        log.info("agent for node %s ready in %.2fs (%d endpoints re-attached)",
                 cfg.datapath.node, self.start_seconds, self.reattached)

    def _register_node_addresses(self) -> None:
        endpoints = EndpointMap(self.config.datapath.pin_dir)
        ipcache = IPCacheMap(self.config.datapath.pin_dir)
        try:
            for ip in self.config.node_ips:
                ipcache.upsert(ip, IDENTITY_HOST)
                endpoints.upsert(ip, endpoint_id=0, ifindex=0, identity=IDENTITY_HOST,
                                 flags=ENDPOINT_F_HOST)
        finally:
            endpoints.close()
            ipcache.close()

    def _attach_devices(self) -> None:
        if not self.config.devices:
            return
        with netns.entered(self.config.node_netns), IPRoute() as ipr:
            for dev in self.config.devices:
                found = ipr.link_lookup(ifname=dev)
                if not found:
                    raise AgentError(f"device {dev} not found in namespace {self.config.node_netns}")
                attach.attach_xdp(ipr, found[0], self.loaded.fd("cil_xdp_entry"), self.config.xdp_mode)

    def stop(self) -> None:
        """Stops the agent's threads. Programs stay attached and maps stay pinned."""
        if os.path.exists(self.config.ready_file):
            os.unlink(self.config.ready_file)
        if self.reader:
            self.reader.stop()
        if self.gc:
            self.gc.stop()
        self.monitor.stop()

    def run_forever(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        self.start()
        try:
            done.wait()
        finally:
            self.stop()
