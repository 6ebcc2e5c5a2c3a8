"""The lab's stand-in for a pod's containers: listens on the given ports inside the pod's
namespace. A TCP connection first receives the pod's name, then gets back whatever it sends
until it closes (so a test can hold a connection open); a UDP datagram is answered with the
pod's name and the datagram.

Run as `python -m cilium_py.lab.listener --name POD --tcp 80 --udp 53`; it prints "ready"
once every socket listens.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys


def serve(name: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    banner = f"{name}\n".encode()
    for port in tcp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(128)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "accept")
    for port in udp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "udp")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if key.data == "accept":
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                try:
                    conn.send(banner)
                except OSError:
                    conn.close()
                    continue
                sel.register(conn, selectors.EVENT_READ, "echo")
            elif key.data == "udp":
                try:
                    data, peer = sock.recvfrom(65535)
                    sock.sendto(banner + data, peer)
                except OSError:
                    pass
            else:
                try:
                    data = sock.recv(65535)
                except OSError:
                    data = b""
                if data:
                    try:
                        sock.sendall(data)
                        continue
                    except OSError:
                        pass
                sel.unregister(sock)
                sock.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    try:
        serve(args.name, args.tcp, args.udp)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
