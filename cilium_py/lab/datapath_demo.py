"""`make demo`, first version: one lab node, three pods, one allow rule, a connection that
succeeds and one that is dropped, then the conntrack table and the monitor's view of it.
Everything it creates is removed at the end, also on failure or Ctrl-C."""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import sys
import threading
import time

from cilium_py.agent.policy.mapstate import PolicyRule, PolicyWriter
from cilium_py.datapath import netns
from cilium_py.lab.harness import PodSpec, RunningNode, running_node
from cilium_py.lab.node import LabNode

NODE = "demo"
BPF_ROOT = "/sys/fs/bpf/ciliumpy-demo"
PODS = {"frontend": 1000, "backend": 1001, "intruder": 1002}


def say(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def ciliumpy(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cilium_py.cli.main", *args], text=True, **kwargs)


def connect(node: RunningNode, pod: str, ip: str, port: int) -> str:
    with netns.entered(node.pods[pod].netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1.5)
    try:
        sock.connect((ip, port))
        return f"connected, backend says {sock.recv(64).decode().strip()!r}"
    except OSError as e:
        return f"failed: {e}"
    finally:
        sock.close()


def leftovers(node: LabNode) -> None:
    for name in node.owned_namespaces():
        netns.remove(name)
    shutil.rmtree(BPF_ROOT, ignore_errors=True)


def main() -> None:
    node = LabNode(NODE, 100)
    leftovers(node)
    say(f"node namespace {node.netns} with cilium_host {node.router_ip}")
    try:
        with running_node(node, bpf_root=BPF_ROOT, node_ips=(str(node.router_ip),)) as running:
            try:
                show(running)
            finally:
                say("cleaning up")
    finally:
        print("removed the namespaces, pins and processes the demo created")


def show(running: RunningNode) -> None:
    print(f"agent compiled, loaded and attached in {running.agent.ready_seconds:.2f}s")

    say("three pods")
    for pod, identity in PODS.items():
        t = time.monotonic()
        ep = running.add_endpoint(pod, PodSpec(identity))
        print(f"  {pod:9} {ep.ip}  identity {identity}  endpoint {ep.endpoint_id}"
              f"  ({(time.monotonic() - t) * 1000:.0f} ms)")
    backend = running.pods["backend"]
    running.listen(backend.netns, "backend", tcp=(80,))

    say("policy: backend accepts TCP/80 from identity 1000 (frontend) only")
    manager = running.manager
    PolicyWriter(manager.policy, manager.endpoints).apply(
        backend.ip, backend.endpoint_id, [PolicyRule(PODS["frontend"], "ingress", 6, 80)],
        enforce_ingress=True, enforce_egress=False)
    ciliumpy("bpf", "policy", "get", str(backend.endpoint_id), "--node", NODE, "--bpf-root", BPF_ROOT)

    monitor = subprocess.Popen([sys.executable, "-m", "cilium_py.cli.main", "monitor", "--node", NODE,
                                "--run-dir", running.run_dir, "-t", "drop", "-t", "policy-verdict"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    running.on_teardown(_stop, monitor)
    monitor.stderr.readline()  # "Listening for events..." once connected

    say("traffic")
    print(f"  frontend -> backend:80  {connect(running, 'frontend', str(backend.ip), 80)}")
    print(f"  intruder -> backend:80  {connect(running, 'intruder', str(backend.ip), 80)}")

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


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(5)


if __name__ == "__main__":
    main()
