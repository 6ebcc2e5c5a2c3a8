"""Pod-to-pod TCP throughput with iperf3 through the datapath, against the same namespaces
and veths with the programs detached (plain veth + routing in the node namespace).

A lab node (namespaces cpy-bench*, addresses 10.244.201.0/24) with the agent in-process
and two endpoints; the server endpoint enforces ingress and allows the client's identity on
TCP 5201. Runs alternate with/without programs so drift affects both alike; medians of each
are compared. Server pinned to CPU 1, client to CPU 0.

Also the datapath cost of trace aggregation: the same programs built with monitor
aggregation "none" (a trace event for every forwarded packet) are loaded next to the
agent's (default "medium": first packet each way, new TCP flags, then once per 5 s), sharing
its pinned maps, and attached instead of them in a third arm of the same interleaved rounds.
An EventReader thread parses the "none" events into a flow ring (the agent's Hubble path)
while it runs, so the ring is drained as it would be in an agent. There is no switch that
turns events off in the datapath; for one bulk TCP stream "medium" emits only a handful of
events, so it stands in for "off", and the no-programs arm bounds it.
"""

from __future__ import annotations

import os
import time

from bench.common import Result, bpf_root, iperf, median

NODE_NAME = "bench"
NODE_INDEX = 201
PORT = 5201
CLIENT_ID, SERVER_ID = 1000, 1001
ROUNDS = 8
SECONDS = 2


def _wait_drained(reader, quiet: float = 0.2, timeout: float = 10.0) -> None:
    """Returns once the reader has received nothing new for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last = reader.received
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if reader.received == last:
            return
        last = reader.received


def _thread_cpu_seconds(thread) -> float:
    """User + system CPU time of one thread of this process, from /proc."""
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(quick: bool = False) -> list[Result]:
    from pyroute2 import IPRoute

    from cilium_py.agent.endpoints import PROGRAMS
    from cilium_py.agent.policy.mapstate import PolicyRule, PolicyWriter
    from cilium_py.datapath import attach, loader, netns
    from cilium_py.datapath.config import DatapathConfig
    from cilium_py.datapath.maps.events import EventsLostMap
    from cilium_py.datapath.monitor import EventReader
    from cilium_py.hubble.parser import Parser
    from cilium_py.hubble.ring import FlowRing
    from cilium_py.lab.harness import PodSpec, running_node
    from cilium_py.lab.node import LabNode

    rounds = 1 if quick else ROUNDS
    seconds = 1 if quick else SECONDS
    root = bpf_root("tput")
    node = LabNode(NODE_NAME, NODE_INDEX)
    pods = {"client": PodSpec(CLIENT_ID), "server": PodSpec(SERVER_ID)}
    with running_node(node, bpf_root=root, pods=pods, in_process=True, devices=(),
                      node_ips=(str(node.router_ip),)) as running:
        agent, dp, em = running.agent, running.config, running.manager
        client, server = running.pods["client"], running.pods["server"]
        PolicyWriter(em.policy, em.endpoints).apply(
            server.ip, server.endpoint_id, [PolicyRule(CLIENT_ID, "ingress", 6, PORT)],
            enforce_ingress=True, enforce_egress=False)

        # The same programs with a trace event per packet, on the agent's pinned maps (their
        # own, unpinned event ring), and a consumer that parses what they emit.
        loaded_none = loader.load(DatapathConfig(node=NODE_NAME, bpf_root=root,
                                                 monitor_aggregation="none"), pin_programs=False)
        running.on_teardown(loaded_none.close)
        lost_map = EventsLostMap(dp.pin_dir)
        running.on_teardown(lost_map.close)
        parser, flows = Parser(NODE_NAME), FlowRing()
        none_reader = EventReader(loaded_none,
                                  on_batch=lambda recs: flows.write(parser.parse_batch(recs)))
        none_reader.start()
        running.on_teardown(none_reader.stop)

        def set_programs(on, loaded=None) -> None:
            loaded = loaded or agent.loaded
            with netns.entered(node.netns), IPRoute() as ipr:
                for ep in (client, server):
                    if on:
                        for prog, direction in PROGRAMS:
                            attach.attach_tc(ipr, ep.ifindex, loaded.fd(prog), direction, prog)
                    else:
                        attach.detach_tc(ipr, ep.ifindex)

        def attached() -> bool:
            with netns.entered(node.netns), IPRoute() as ipr:
                return all(attach.tc_program_names(ipr, ep.ifindex, attach.INGRESS)
                           for ep in (client, server))

        with_bpf, without, with_none = [], [], []
        none_events, none_lost, none_cpu, medium_events = [], [], [], []
        for _ in range(rounds):
            for on, out, loaded in ((True, with_bpf, None), (False, without, None),
                                    (True, with_none, loaded_none)):
                set_programs(on, loaded)
                if attached() != on:
                    raise RuntimeError("programs are not in the state this round needs")
                got0, none0, lost0 = agent.reader.received, none_reader.received, lost_map.total()
                cpu0 = _thread_cpu_seconds(none_reader._thread)
                out.append(iperf(server.netns, client.netns, str(server.ip), seconds, server_port=PORT))
                if loaded is loaded_none:
                    _wait_drained(none_reader)  # no backlog parsed into the next round
                    none_events.append(none_reader.received - none0)
                    none_lost.append(lost_map.total() - lost0)
                    none_cpu.append((_thread_cpu_seconds(none_reader._thread) - cpu0) / seconds)
                elif on:
                    medium_events.append(agent.reader.received - got0)
        set_programs(True)
        if parser.errors:
            raise RuntimeError(f"{parser.errors} trace records did not parse")
        w, wo = median(with_bpf), median(without)
        ratio = w / wo
        lost = agent.reader.perf_lost if agent.reader else 0
        n = median(with_none)
        ev_rate = median([e / seconds for e in none_events])
        trace = Result(
            "throughput: monitor aggregation none vs medium", f"{n:.2f} Gbit/s none",
            f"{w:.2f} Gbit/s medium", n / w,
            notes=[f"same {rounds} rounds, third arm: programs built with monitor aggregation "
                   "none attached instead of the agent's (medium); none: "
                   + ", ".join(f"{x:.2f}" for x in with_none) + " Gbit/s; "
                   f"none / no programs {n / wo:.2f}x; median of per-round ratios none / "
                   f"medium {median([a / b for a, b in zip(with_none, with_bpf)]):.2f}x, best of "
                   f"each {max(with_none) / max(with_bpf):.2f}x",
                   f"events with none: {ev_rate / 1000:.0f} k/s delivered and parsed (median "
                   f"per round; {sum(none_events)} in all, {sum(none_lost)} lost in the datapath), "
                   f"by an EventReader -> Parser -> FlowRing thread in this process "
                   f"that used {median(none_cpu):.2f} CPU per second of iperf3 (of the "
                   f"{os.cpu_count()} CPUs iperf3 client and server run on); "
                   f"with medium: {sum(medium_events)} events in all rounds",
                   "no datapath switch turns events off (aggregation is none or medium); "
                   "medium emits a handful of events per connection, so for one bulk stream it "
                   "stands in for events off, and the no-programs arm bounds it"])
        return [Result(
            "throughput: pod-to-pod TCP (iperf3)", f"{w:.2f} Gbit/s",
            f"{wo:.2f} Gbit/s no programs", ratio, ">= 0.95x", ratio >= 0.95,
            [f"{rounds} rounds x {seconds} s each, interleaved; with: "
             + ", ".join(f"{x:.2f}" for x in with_bpf) + "; without: "
             + ", ".join(f"{x:.2f}" for x in without) + " Gbit/s",
             f"best of each: {max(with_bpf):.2f} vs {max(without):.2f} Gbit/s "
             f"({max(with_bpf) / max(without):.2f}x); median of per-round ratios "
             f"{median([a / b for a, b in zip(with_bpf, without)]):.2f}x",
             f"ingress policy enforced on the server (allow identity {CLIENT_ID} TCP {PORT}); "
             f"events delivered to the agent: {agent.reader.received if agent.reader else 0}"
             + (f", perf lost {lost}" if lost else "")]), trace]


if __name__ == "__main__":
    for row in run():
        print(row)
