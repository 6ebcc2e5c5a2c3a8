"""Starting the lab's stand-in containers (cilium_py.lab.listener) in pod namespaces.

`start_listener` is the one place that builds a listener's command line; the lab, the
demos, the netns tests and the benchmarks all start listeners through it. `LabListeners`
is what the agent runs in lab mode (`ciliumpy agent --lab`): endpoint hooks that give each
pod a listener on its TCP and UDP containerPorts, tracked by pidfiles so that listeners
outlive an agent restart, as containers would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

from cilium_py.agent.endpoints import EndpointHandle
from cilium_py.agent.hooks import EndpointHooks
from cilium_py.datapath import netns
from cilium_py.lab.process import alive, read_pid, stop_pid


class ListenerError(RuntimeError):
    pass


def listener_argv(name: str, tcp: Iterable[int] = (), udp: Iterable[int] = ()) -> list[str]:
    argv = [sys.executable, "-m", "cilium_py.lab.listener", "--name", name]
    for port in tcp:
        argv += ["--tcp", str(port)]
    for port in udp:
        argv += ["--udp", str(port)]
    return argv


def start_listener(ns: str, name: str, tcp: Iterable[int] = (), udp: Iterable[int] = (), *,
                   detached: bool = False) -> subprocess.Popen:
    """A listener in namespace `ns` answering with `name`; returns once every port listens,
    so callers never race connections against a listener still importing Python.
    `detached`: a session of its own, so it outlives the process that started it."""
    tcp, udp = tuple(tcp), tuple(udp)
    proc = netns.popen(ns, listener_argv(name, tcp, udp), stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL if detached else None,
                       start_new_session=detached, text=True)
    ready = proc.stdout.readline().strip() == "ready"
    proc.stdout.close()
    if not ready:
        proc.wait(5)
        raise ListenerError(f"listener {name} in {ns} exited before listening "
                            f"(tcp {list(tcp)}, udp {list(udp)}, exit code {proc.returncode})")
    return proc


class LabListeners(EndpointHooks):
    def __init__(self, pid_dir: str | os.PathLike,
                 launch: Callable[..., subprocess.Popen] = start_listener):
        self.pid_dir = Path(pid_dir)
        self.launch = launch

    def pidfile(self, key: str) -> Path:
        return self.pid_dir / (key.replace("/", "_") + ".pid")

    def endpoint_created(self, key: str, handle: EndpointHandle, ports: list) -> None:
        pidfile = self.pidfile(key)
        if alive(read_pid(pidfile)):
            return  # started by an earlier agent; it kept serving across the restart
        tcp = [port for port, proto in ports if proto == "TCP"]
        udp = [port for port, proto in ports if proto == "UDP"]
        if not tcp and not udp:
            return
        proc = self.launch(handle.netns, key, tcp, udp, detached=True)
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(str(proc.pid))

    def endpoint_removed(self, key: str) -> None:
        pidfile = self.pidfile(key)
        if pidfile.exists():
            stop_pid(read_pid(pidfile), timeout=None)
            pidfile.unlink()

    def stop_all(self) -> int:
        """Stops every listener with a pidfile here (what `lab down` does); returns how many ran."""
        if not self.pid_dir.is_dir():
            return 0
        stopped = 0
        for pidfile in sorted(self.pid_dir.glob("*.pid")):
            stopped += stop_pid(read_pid(pidfile), timeout=None)
            pidfile.unlink()
        return stopped
