"""Connects to a service N times and counts which backend answered (the lab's listeners
greet with the pod's name: TCP sends it first, UDP puts it before the echo).

    python -m cilium_py.lab.lbprobe 10.96.100.10:80 --count 30 [--udp] [--timeout 1]

Prints one JSON object: {"target", "protocol", "counts": {backend: n}, "failed": n,
"errors": {error: n}}. Run it where the client should be: `ciliumpy lab exec POD -- ...`
(inside a pod's namespace and the lab's cgroup, so socket load balancing applies) or
`ciliumpy lab exec --external -- ...` (outside the node, for NodePorts). Every attempt is
a new socket, so a new source port and a new load-balancing decision.
"""

from __future__ import annotations

import argparse
import json
import socket
from collections import Counter


def probe_once(host: str, port: int, udp: bool, timeout: float) -> str:
    """The name of the backend that answered; raises OSError when none did."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.settimeout(timeout)
        if udp:
            sock.sendto(b"probe", (host, port))
            data = sock.recv(512)
        else:
            sock.connect((host, port))
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
    name = data.split(b"\n", 1)[0].decode(errors="replace").strip()
    if not name:
        raise OSError("the backend answered nothing")
    return name


def probe(target: str, count: int, udp: bool = False, timeout: float = 1.0) -> dict:
    host, _, port = target.rpartition(":")
    counts: Counter = Counter()
    errors: Counter = Counter()
    for _ in range(count):
        try:
            counts[probe_once(host, int(port), udp, timeout)] += 1
        except OSError as e:
            errors[type(e).__name__ if not e.strerror else e.strerror] += 1
    return {"target": target, "protocol": "UDP" if udp else "TCP", "counts": dict(sorted(counts.items())),
            "failed": sum(errors.values()), "errors": dict(errors)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="IP:PORT")
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--udp", action="store_true")
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.target, args.count, args.udp, args.timeout)))


if __name__ == "__main__":
    main()
