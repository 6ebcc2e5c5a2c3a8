"""The agent's REST API on a unix socket (mode 0600): status, endpoints, identities,
policy and waiting for a policy revision. JSON in and out; the CLI is its client."""

from __future__ import annotations

import json
import os
import re
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

ROUTES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^/v1/status$"), "status"),
    (re.compile(r"^/v1/endpoints$"), "endpoints"),
    (re.compile(r"^/v1/endpoints/(?P<id>\d+)$"), "endpoint"),
    (re.compile(r"^/v1/identities$"), "identities"),
    (re.compile(r"^/v1/identities/(?P<id>\d+)$"), "identity"),
    (re.compile(r"^/v1/policy$"), "policy"),
    (re.compile(r"^/v1/policy/wait$"), "policy_wait"),
    (re.compile(r"^/v1/sync$"), "sync"),
    (re.compile(r"^/v1/services$"), "services"),
    (re.compile(r"^/v1/services/wait$"), "services_wait"),
    (re.compile(r"^/v1/services/(?P<id>\d+)$"), "service"),
]


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class APIError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class APIServer:
    def __init__(self, path: str, agent):
        self.path = path
        self.agent = agent
        self._server: _UnixHTTPServer | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                api._dispatch(self)

            def log_message(self, *args):
                pass

        old_umask = os.umask(0o177)  # the socket is created 0600: only root talks to the agent
        try:
            self._server = _UnixHTTPServer(self.path, Handler)
        finally:
            os.umask(old_umask)
        threading.Thread(target=self._server.serve_forever, name="api", daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            for pattern, name in ROUTES:
                match = pattern.match(url.path)
                if match:
                    body = getattr(self, "_" + name)(query=query, **match.groupdict())
                    break
            else:
                raise APIError(404, f"no such API path: {url.path}")
            status = 200
        except APIError as e:
            status, body = e.status, {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - a bug answers 500, the agent keeps running
            status, body = 500, {"error": f"internal error: {e}"}
        raw = json.dumps(body, default=str).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)

    # -- routes ---------------------------------------------------------------------------

    def _status(self, query):
        return self.agent.status()

    def _control(self):
        if self.agent.control is None:
            raise APIError(400, "the agent runs without a manifests source: no endpoints or policy")
        return self.agent.control

    def _endpoints(self, query):
        return self._control().endpoint_views()

    def _endpoint(self, query, id):
        for view in self._control().endpoint_views():
            if view["id"] == int(id):
                return view
        raise APIError(404, f"endpoint {id} not found")

    def _identities(self, query):
        from cilium_py.agent.labels import format_labels

        return [{"id": i, "labels": format_labels(labels)}
                for i, labels in sorted(self._control().identities.all().items())]

    def _identity(self, query, id):
        from cilium_py.agent.labels import format_labels

        labels = self._control().identities.lookup(int(id))
        if labels is None:
            raise APIError(404, f"identity {id} not found")
        return {"id": int(id), "labels": format_labels(labels)}

    def _policy(self, query):
        return self._control().policy_view()

    def _sync(self, query):
        """Reads the sources now instead of at the next poll; the answer's revision covers
        everything they hold."""
        if self.agent.control is None:
            raise APIError(400, "the agent runs without a manifests source")
        return {"revision": self.agent.sync_sources()}

    # -- services (kube-proxy replacement) --------------------------------------------------

    def _service_manager(self):
        if getattr(self.agent, "services", None) is None:
            raise APIError(400, "the agent runs without a manifests source: no services")
        return self.agent.services

    def _services(self, query):
        manager = self._service_manager()
        return {"services": manager.service_views(), **manager.problems(),
                "revision": manager.revision, "realized_revision": manager.realized_revision}

    def _service(self, query, id):
        view = self._service_manager().service_view(int(id))
        if view is None:
            raise APIError(404, f"service {id} not found")
        return view

    def _services_wait(self, query):
        """Waits until the services are programmed as of `revision` (default: now)."""
        manager = self._service_manager()
        try:
            revision = int(query.get("revision", "0")) or manager.revision
            timeout = float(query.get("timeout", "30"))
        except ValueError as e:
            raise APIError(400, f"revision and timeout must be numbers: {e}") from None
        ok = manager.wait_for_revision(revision, timeout)
        return {"realized": ok, "revision": revision, "realized_revision": manager.realized_revision}

    def _policy_wait(self, query):
        try:
            revision = int(query.get("revision", "0"))
            timeout = float(query.get("timeout", "30"))
        except ValueError as e:
            raise APIError(400, f"revision and timeout must be numbers: {e}") from None
        control = self._control()
        ok = control.wait_for_revision(revision, timeout)
        # Realized for the node, but not for these: `policy wait` and `lab apply` fail on them.
        return {"realized": ok, "revision": control.realized_revision(),
                "failed_endpoints": control.failed_endpoints()}
