"""`make demo`, first version: one lab node, three pods, one allow rule, a connection that
succeeds and one that is dropped, then the conntrack table and the monitor's view of it.
Everything it creates is removed at the end, also on failure or Ctrl-C."""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from cilium_py.agent.endpoints import EndpointManager
from cilium_py.agent.policy.mapstate import PolicyRule, PolicyWriter
from cilium_py.datapath import netns
from cilium_py.datapath.config import DatapathConfig
from cilium_py.lab.agentproc import AgentProcess
from cilium_py.lab.node import LabNode

NODE = "demo"
BPF_ROOT = "/sys/fs/bpf/ciliumpy-demo"
PODS = {"frontend": 1000, "backend": 1001, "intruder": 1002}


def say(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def ciliumpy(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cilium_py.cli.main", *args], text=True, **kwargs)


def connect(manager: EndpointManager, pod: str, ip: str, port: int) -> str:
    with netns.entered(manager.pod_netns(pod)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1.5)
    try:
        sock.connect((ip, port))
        return f"connected, backend says {sock.recv(64).decode().strip()!r}"
    except OSError as e:
        return f"failed: {e}"
    finally:
        sock.close()


def leftovers() -> None:
    node = LabNode(NODE, 100)
    for name in netns.list_names(node.netns):
        netns.remove(name)
    shutil.rmtree(BPF_ROOT, ignore_errors=True)


def main() -> None:
    leftovers()
    run_dir = tempfile.mkdtemp(prefix="ciliumpy-demo-")
    node = LabNode(NODE, 100)
    config = DatapathConfig(node=NODE, bpf_root=BPF_ROOT)
    agent = manager = monitor = listener = None
    try:
        say(f"node namespace {node.netns} with cilium_host {node.router_ip}")
        node.create()
        agent = AgentProcess(node=NODE, bpf_root=BPF_ROOT, run_dir=run_dir, node_netns=node.netns,
                             devices=("eth0",), node_ips=(str(node.router_ip),))
        started = time.monotonic()
        agent.start()
        print(f"agent compiled, loaded and attached in {time.monotonic() - started:.2f}s")

        say("three pods")
        manager = EndpointManager(config, node.netns, node.router_ip)
        pods = {}
        for n, (pod, identity) in enumerate(PODS.items(), start=1):
            t = time.monotonic()
            pods[pod] = manager.create(pod, node.addressing.pod_ip(n), identity)
            print(f"  {pod:9} {pods[pod].ip}  identity {identity}  endpoint {pods[pod].endpoint_id}"
                  f"  ({(time.monotonic() - t) * 1000:.0f} ms)")
        listener = netns.popen(pods["backend"].netns, [sys.executable, "-m", "cilium_py.lab.listener",
                                                       "--name", "backend", "--tcp", "80"],
                               stdout=subprocess.PIPE, text=True)
        listener.stdout.readline()

        say("policy: backend accepts TCP/80 from identity 1000 (frontend) only")
        backend = pods["backend"]
        PolicyWriter(manager.policy, manager.endpoints).apply(
            backend.ip, backend.endpoint_id, [PolicyRule(PODS["frontend"], "ingress", 6, 80)],
            enforce_ingress=True, enforce_egress=False)
        ciliumpy("bpf", "policy", "get", str(backend.endpoint_id), "--node", NODE, "--bpf-root", BPF_ROOT)

        monitor = subprocess.Popen([sys.executable, "-m", "cilium_py.cli.main", "monitor", "--node", NODE,
                                    "--run-dir", run_dir, "-t", "drop", "-t", "policy-verdict"],
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        monitor.stderr.readline()  # "Listening for events..." once connected

        say("traffic")
        print(f"  frontend -> backend:80  {connect(manager, 'frontend', str(backend.ip), 80)}")
        print(f"  intruder -> backend:80  {connect(manager, 'intruder', str(backend.ip), 80)}")

        say("ciliumpy bpf ct list global")
        ciliumpy("bpf", "ct", "list", "global", "--node", NODE, "--bpf-root", BPF_ROOT)

        say("ciliumpy bpf metrics list")
        ciliumpy("bpf", "metrics", "list", "--node", NODE, "--bpf-root", BPF_ROOT)

        say("ciliumpy monitor -t drop -t policy-verdict")
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in monitor.stdout], daemon=True).start()
        deadline = time.monotonic() + 2.0
        for _ in range(6):
            try:
                print(lines.get(timeout=max(deadline - time.monotonic(), 0.01)).rstrip())
            except queue.Empty:
                break
    finally:
        say("cleaning up")
        for proc in (monitor, listener):
            if proc is not None:
                proc.terminate()
                proc.wait(5)
        if agent is not None:
            agent.stop()
        if manager is not None:
            for pod in PODS:
                manager.delete(pod)
            manager.close()
        node.destroy()
        shutil.rmtree(BPF_ROOT, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        print("removed the namespaces, pins and processes the demo created")


if __name__ == "__main__":
    main()
