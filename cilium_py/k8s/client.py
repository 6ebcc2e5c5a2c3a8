"""A thin client for the Kubernetes API on plain JSON documents, over the official client's
ApiClient (which does kubeconfig, in-cluster config, TLS and token refresh).

Why raw documents and not the official client's typed models: every object goes through
ciliumpy's own parser for its kind (cilium_py.agent.objects), the same one the manifests
directory uses, and the typed models would be converted back to dicts for it at a high
cost per object. The CRDs have no typed models anyway.

Errors are ApiError, which says whether retrying can help (`retryable`) and carries the
API server's Status reason and message.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

from cilium_py.k8s.resources import ApiResource, resource

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
# Every write asks the server to refuse unknown fields instead of pruning them (its default
# for other clients): a pruned field inside a policy rule (a misspelt fromEndpoints, say)
# would silently widen that rule.
STRICT = "Strict"

_RETRYABLE_STATUS = {0, 408, 429, 500, 502, 503, 504}


class ApiError(Exception):
    """A request the API server refused or that did not reach it (status 0)."""

    def __init__(self, status: int, reason: str, message: str, what: str = ""):
        self.status, self.reason, self.message, self.what = status, reason, message, what
        super().__init__(f"{what}: {message} ({status} {reason})" if what else f"{message} ({status} {reason})")

    @property
    def retryable(self) -> bool:
        return self.status in _RETRYABLE_STATUS

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """409: AlreadyExists on create, or a stale resourceVersion on update."""
        return self.status == 409

    @property
    def gone(self) -> bool:
        """410: the resourceVersion (or continue token) is older than the server keeps."""
        return self.status == 410

    @classmethod
    def from_status(cls, status: dict, what: str = "") -> "ApiError":
        return cls(int(status.get("code") or 0), str(status.get("reason") or ""),
                   str(status.get("message") or status), what)


def _status_error(status: int, reason: str, data, what: str) -> ApiError:
    """The ApiError for an answer other than 2xx, from the Status document it carries."""
    try:
        body = json.loads(data or "{}")
    except (TypeError, ValueError):
        body = {}
    if isinstance(body, dict) and body.get("kind") == "Status":
        return ApiError.from_status({**body, "code": body.get("code") or status}, what)
    text = (data.decode(errors="replace") if isinstance(data, bytes) else str(data or reason)).strip()
    return ApiError(int(status or 0), str(reason or ""), text, what)


def _api_error(e: Exception, what: str) -> ApiError:
    from kubernetes.client.exceptions import ApiException

    if isinstance(e, ApiException):
        return _status_error(int(e.status or 0), str(e.reason or ""), e.body, what)
    # urllib3 and socket errors: the server was not reached or the connection broke.
    return ApiError(0, type(e).__name__, str(e), what)


def load_configuration(kubeconfig: str | None = None, context: str | None = None):
    """The official client's Configuration: from `kubeconfig` when given (or $KUBECONFIG),
    else in-cluster (a pod's service-account token and KUBERNETES_SERVICE_HOST), else
    ~/.kube/config."""
    from kubernetes import client, config

    conf = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG", "")
    if not path and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=conf)
        return conf
    config.load_kube_config(config_file=path or None, context=context, client_configuration=conf,
                            persist_config=False)
    return conf


class Kube:
    """Requests by kind (see cilium_py.k8s.resources) on JSON documents. Thread-safe: the
    underlying urllib3 pool is."""

    def __init__(self, kubeconfig: str | None = None, *, context: str | None = None,
                 configuration=None, timeout: float = 30.0, user_agent: str = "ciliumpy"):
        from kubernetes import client

        conf = configuration or load_configuration(kubeconfig, context)
        # Each watch holds a connection; the default pool of 4 would serialize a source's
        # eleven watches behind each other.
        conf.connection_pool_maxsize = max(conf.connection_pool_maxsize or 0, 32)
        self.configuration = conf
        self.host = conf.host
        self._api = client.ApiClient(conf)
        self._api.user_agent = user_agent
        self.timeout = timeout

    def close(self) -> None:
        self._api.close()

    # -- requests ------------------------------------------------------------------

    def request(self, method: str, path: str, *, query: dict | None = None, body=None,
                content_type: str = "application/json", timeout: float | None = None,
                what: str = "") -> dict:
        """One request; the decoded JSON answer ({} when empty). Raises ApiError."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        resp = self._send(method, path, query or {}, headers, body, timeout or self.timeout,
                          what or f"{method} {path}")
        try:
            data = resp.data
        except Exception as e:  # noqa: BLE001 - a connection broken while reading the answer
            raise _api_error(e, what or f"{method} {path}") from None
        finally:
            resp.release_conn()
        return json.loads(data) if data else {}

    def _send(self, method: str, path: str, query: dict, headers: dict, body, timeout, what: str):
        """Sends one request; the urllib3 response, its body not read yet. Raises ApiError
        when the server was not reached or answered other than 2xx. (The official client's
        ApiClient, as generated since its move to the new OpenAPI generator (v37 here),
        builds URL, query and auth headers in param_serialize and sends in call_api, which
        checks no status.)"""
        try:
            method, url, headers, body, _ = self._api.param_serialize(
                method, path, query_params=list(query.items()), header_params=headers, body=body,
                auth_settings=["BearerToken"])
            resp = self._api.call_api(method, url, header_params=headers, body=body,
                                      _request_timeout=timeout).response
        except Exception as e:  # noqa: BLE001 - every failure becomes an ApiError
            raise _api_error(e, what) from None
        if not 200 <= resp.status < 300:
            try:
                data = resp.data
            except Exception:  # noqa: BLE001 - the Status is a nicety; the code is what counts
                data = b""
            resp.release_conn()
            raise _status_error(resp.status, resp.reason, data, what)
        return resp

    def version(self) -> dict:
        return self.request("GET", "/version")

    def get(self, kind: str, name: str, namespace: str | None = None, *,
            subresource: str | None = None) -> dict:
        res = resource(kind)
        return self.request("GET", res.path(namespace, name, subresource), what=_what(res, namespace, name))

    def get_or_none(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        try:
            return self.get(kind, name, namespace)
        except ApiError as e:
            if e.not_found:
                return None
            raise

    def list(self, kind: str, namespace: str | None = None, *, limit: int = 500,
             continue_token: str = "", resource_version: str | None = None,
             label_selector: str = "", field_selector: str = "") -> dict:
        """One page of a list; the caller follows metadata.continue."""
        query: dict = {"limit": limit}
        if continue_token:
            query["continue"] = continue_token
        if resource_version is not None:
            query["resourceVersion"] = resource_version
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        res = resource(kind)
        return self.request("GET", res.path(namespace), query=query, what=f"list {res.plural}")

    def list_all(self, kind: str, namespace: str | None = None, *, limit: int = 500,
                 label_selector: str = "", field_selector: str = "") -> tuple[list[dict], str]:
        """Every object, page by page (each item gets its kind and apiVersion back, which
        the server leaves out of list items), and the list's resourceVersion."""
        res = resource(kind)
        items: list[dict] = []
        token = ""
        while True:
            page = self.list(kind, namespace, limit=limit, continue_token=token,
                             label_selector=label_selector, field_selector=field_selector)
            for item in page.get("items") or []:
                item.setdefault("kind", res.kind)
                item.setdefault("apiVersion", res.api_version)
                items.append(item)
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def create(self, kind: str, body: dict, namespace: str | None = None, *,
               dry_run: bool = False) -> dict:
        res = resource(kind)
        ns = namespace if namespace is not None else (body.get("metadata") or {}).get("namespace")
        query = {"fieldValidation": STRICT, **({"dryRun": "All"} if dry_run else {})}
        name = (body.get("metadata") or {}).get("name", "")
        return self.request("POST", res.path(ns), body=body, query=query, what=f"create {_what(res, ns, name)}")

    def replace(self, kind: str, body: dict, *, subresource: str | None = None) -> dict:
        """PUT: fails with a conflict (409) when body's resourceVersion is stale."""
        res = resource(kind)
        meta = body.get("metadata") or {}
        ns, name = meta.get("namespace"), meta["name"]
        return self.request("PUT", res.path(ns, name, subresource), body=body,
                            query={"fieldValidation": STRICT}, what=f"update {_what(res, ns, name)}")

    def patch(self, kind: str, name: str, patch, namespace: str | None = None, *,
              subresource: str | None = None, content_type: str = MERGE_PATCH) -> dict:
        res = resource(kind)
        return self.request("PATCH", res.path(namespace, name, subresource), body=patch,
                            query={"fieldValidation": STRICT}, content_type=content_type, what=f"patch {_what(res, namespace, name)}")

    def delete(self, kind: str, name: str, namespace: str | None = None, *,
               preconditions: dict | None = None, missing_ok: bool = False) -> dict:
        """Deletes; with `preconditions` ({"uid": .., "resourceVersion": ..}) only that exact
        version (a conflict otherwise)."""
        res = resource(kind)
        body = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if preconditions:
            body["preconditions"] = preconditions
        try:
            return self.request("DELETE", res.path(namespace, name), body=body,
                                what=f"delete {_what(res, namespace, name)}")
        except ApiError as e:
            if missing_ok and e.not_found:
                return {}
            raise

    def watch(self, kind: str, resource_version: str, namespace: str | None = None, *,
              timeout_seconds: int = 300, bookmarks: bool = True, label_selector: str = "",
              field_selector: str = "") -> "WatchStream":
        """A watch from `resource_version` (exclusive), with bookmarks. The server ends it
        after `timeout_seconds`; the client gives up reading a minute later. The selectors
        must be those of the list the resourceVersion came from."""
        res = resource(kind)
        query = {"watch": "1", "resourceVersion": resource_version, "timeoutSeconds": timeout_seconds}
        if bookmarks:
            query["allowWatchBookmarks"] = "true"
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        resp = self._send("GET", res.path(namespace), query, {"Accept": "application/json"}, None,
                          (self.timeout, timeout_seconds + 60), f"watch {res.plural}")
        return WatchStream(resp, res)


class WatchStream:
    """The events of one watch as dicts ({"type", "object"}); an in-stream ERROR event is
    raised as ApiError (410 Gone among them). close() from another thread ends it."""

    def __init__(self, response, res: ApiResource):
        self._resp = response
        self._res = res
        self.closed = False

    def close(self) -> None:
        self.closed = True
        # Closing the response does not wake a thread blocked reading the TLS socket;
        # shutting the socket down does (the connection is not reused after this).
        sock = getattr(getattr(self._resp, "_connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._resp.close()
            self._resp.release_conn()
        except Exception:  # noqa: BLE001 - already broken
            pass

    def __iter__(self) -> Iterator[dict]:
        buffer = b""
        try:
            for chunk in self._resp.stream(amt=None, decode_content=False):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield self._event(line)
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken stream ends the watch
            if not self.closed:
                raise _api_error(e, f"watch {self._res.plural}") from None
        finally:
            self.close()
        if buffer.strip():
            yield self._event(buffer)

    def _event(self, line: bytes) -> dict:
        event = json.loads(line)
        obj = event.get("object") or {}
        if event.get("type") == "ERROR":
            raise ApiError.from_status(obj, f"watch {self._res.plural}")
        obj.setdefault("kind", self._res.kind)
        obj.setdefault("apiVersion", self._res.api_version)
        return event


def _what(res: ApiResource, namespace: str | None, name: str) -> str:
    return f"{res.kind} {namespace}/{name}" if res.namespaced and namespace else f"{res.kind} {name}"
