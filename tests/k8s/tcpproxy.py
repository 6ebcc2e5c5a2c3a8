"""A loopback TCP forwarder in front of the API server, so a test can break a client's
connections (as a network failure or an API server restart would) while the test itself
keeps talking to the API server directly. TLS passes through untouched: the serving
certificate names 127.0.0.1, whatever the port."""

from __future__ import annotations

import json
import socket
import threading

import yaml


class TcpProxy:
    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._paused = False
        self._closed = False
        self.accepted = 0
        threading.Thread(target=self._accept, name="tcpproxy-accept", daemon=True).start()

    def pause(self) -> None:
        """Breaks every connection and refuses (closes at once) every new one."""
        with self._lock:
            self._paused = True
        self.break_connections()

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def break_connections(self) -> int:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                _close(s)
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.break_connections()

    def write_kubeconfig(self, source: str, path: str) -> str:
        """A copy of kubeconfig `source` whose server is this proxy."""
        with open(source) as f:
            config = yaml.safe_load(f)
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                paused = self._paused
            if paused:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="tcpproxy-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
