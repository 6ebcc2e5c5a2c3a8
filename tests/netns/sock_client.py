"""A client process for the service tests: started inside a pod's network namespace (and,
for the socket-LB tests, inside the test cgroup), it runs one socket operation per JSON
request line on stdin and answers with one JSON line on stdout.

Requests:
  {"op": "tcp", "ip", "port"}            connect, read the banner, report the peer, close
  {"op": "open", "id", "ip", "port"}     the same, but keep the connection as `id`
  {"op": "echo", "id", "data"}           send on connection `id`, read the echo
  {"op": "close", "id"}
  {"op": "udp", "ip", "port", "data", "connected"}
                                         one datagram and its answer, with its source
Every answer has "ok"; a failure carries "errno" and "error"; "elapsed" is in seconds.
"""

from __future__ import annotations

import json
import socket
import sys
import time

TIMEOUT = 2.0


def _banner(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def main() -> None:
    held: dict[str, socket.socket] = {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        started = time.monotonic()
        out: dict = {"ok": True}
        try:
            if op in ("tcp", "open"):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.settimeout(req.get("timeout", TIMEOUT))
                try:
                    sock.connect((req["ip"], req["port"]))
                    out["name"] = _banner(sock)
                    out["peer"] = list(sock.getpeername())
                    out["local"] = list(sock.getsockname())
                except BaseException:
                    sock.close()
                    raise
                if op == "open":
                    held[req["id"]] = sock
                else:
                    sock.close()
            elif op == "echo":
                sock = held[req["id"]]
                sock.sendall(req["data"].encode())
                out["data"] = sock.recv(256).decode()
            elif op == "close":
                held.pop(req["id"]).close()
            elif op == "udp":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.settimeout(req.get("timeout", TIMEOUT))
                    dst = (req["ip"], req["port"])
                    if req.get("connected"):
                        sock.connect(dst)
                        out["peer"] = list(sock.getpeername())
                        sock.send(req["data"].encode())
                    else:
                        sock.sendto(req["data"].encode(), dst)
                    data, source = sock.recvfrom(256)
                    out["data"] = data.decode()
                    out["source"] = list(source)
            else:
                raise ValueError(f"unknown op {op!r}")
        except OSError as e:
            out = {"ok": False, "errno": e.errno, "error": str(e)}
        out["elapsed"] = time.monotonic() - started
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
