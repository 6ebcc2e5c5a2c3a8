"""Talking to the agent's API socket, for the CLI and the lab."""

from __future__ import annotations

import http.client
import json
import socket

from cilium_py import defaults
from cilium_py.agent.paths import RunPaths


class AgentUnavailable(ConnectionError):
    """No agent answers on the socket; the message says which one was tried."""


class AgentAPIError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def api_socket(run_dir: str = defaults.RUN_DIR, node: str = defaults.NODE_NAME) -> str:
    return RunPaths(run_dir, node).api_socket


class AgentClient:
    def __init__(self, path: str, timeout: float = 60.0):
        self.path = path
        self.timeout = timeout

    def get(self, api_path: str, timeout: float | None = None):
        conn = _UnixConnection(self.path, timeout or self.timeout)
        try:
            conn.request("GET", api_path)
            response = conn.getresponse()
            body = json.loads(response.read() or b"null")
        except (FileNotFoundError, ConnectionRefusedError):
            raise AgentUnavailable(f"no agent answers on {self.path}: is it running?") from None
        finally:
            conn.close()
        if response.status != 200:
            raise AgentAPIError(response.status, body.get("error", f"HTTP {response.status}"))
        return body

    def status(self):
        return self.get("/v1/status")

    def endpoints(self):
        return self.get("/v1/endpoints")

    def endpoint(self, endpoint_id: int):
        return self.get(f"/v1/endpoints/{endpoint_id}")

    def identities(self):
        return self.get("/v1/identities")

    def identity(self, identity: int):
        return self.get(f"/v1/identities/{identity}")

    def policy(self):
        return self.get("/v1/policy")

    def wait_revision(self, revision: int, timeout: float = 30.0) -> dict:
        return self.get(f"/v1/policy/wait?revision={revision}&timeout={timeout}", timeout=timeout + 5)
