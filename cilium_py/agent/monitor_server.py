"""Relays datapath events to `ciliumpy monitor` clients over a unix socket, one JSON object
per line, the first being {"type": "hello"}. Each client has its own bounded queue: a slow client loses its own events (and is
told how many), never slows the reader or other clients."""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading

log = logging.getLogger(__name__)

CLIENT_QUEUE_LEN = 8192
HELLO = json.dumps({"type": "hello"}).encode() + b"\n"


class _Client:
    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.queue: queue.Queue = queue.Queue(CLIENT_QUEUE_LEN)
        self.dropped = 0
        self.alive = True


class MonitorServer:
    def __init__(self, path: str):
        self.path = path
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        threading.Thread(target=self._accept_loop, name="monitor-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            client = _Client(conn)
            with self._lock:
                self._clients.append(client)
            # Greeted only once registered: a client that waits for this line misses no
            # event published after it.
            client.queue.put_nowait(HELLO)
            threading.Thread(target=self._send_loop, args=(client,), name="monitor-client",
                             daemon=True).start()

    def _send_loop(self, client: _Client) -> None:
        try:
            while client.alive:
                item = client.queue.get()
                if item is None:
                    break
                if client.dropped:
                    lost, client.dropped = client.dropped, 0
                    client.conn.sendall(json.dumps({"type": "lost", "count": lost}).encode() + b"\n")
                client.conn.sendall(item)
        except OSError:
            pass
        finally:
            client.alive = False
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.conn.close()

    def publish(self, event) -> None:
        with self._lock:
            clients = list(self._clients)
        if not clients:
            return  # nobody listening: skip the encoding, it is per event
        line = json.dumps(event.to_dict()).encode() + b"\n"
        for client in clients:
            try:
                client.queue.put_nowait(line)
            except queue.Full:
                client.dropped += 1

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.alive = False
            try:
                client.queue.put_nowait(None)
            except queue.Full:
                pass
            try:
                client.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if os.path.exists(self.path):
            os.unlink(self.path)
