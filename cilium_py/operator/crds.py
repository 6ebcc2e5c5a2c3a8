"""Installing ciliumpy's CustomResourceDefinitions: each is created, or replaced when what the
API server holds differs from ours, and then waited for until the API server serves it.

Whether a CRD differs is asked of the API server itself: a dry-run replace returns the spec
as the server would store it, its defaults filled in, so "unchanged" means exactly that a
real replace would change nothing (comparing with our own document would see every default
the server adds as a difference, and rewrite the CRD on every operator start).
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import yaml

from cilium_py.k8s.client import ApiError, Kube
from cilium_py.k8s.resources import resource

CRD_KIND = "CustomResourceDefinition"
CRD_API_VERSION = "apiextensions.k8s.io/v1"

CREATED, UPDATED, UNCHANGED = "created", "updated", "unchanged"

# Writes race with other writers (a second operator, a user's kubectl apply): each conflict
# re-reads the CRD and decides again, this many times.
_CONFLICT_RETRIES = 5


class CRDError(RuntimeError):
    """A CRD that could not be installed. `retryable`: whether trying again may help (the
    API server was slow to establish it) or not (its names clash with another CRD's)."""

    def __init__(self, message: str, *, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


def load_crds(directory: str | Path | None = None) -> list[dict]:
    """The CRDs to install. Without a directory, ciliumpy's own: built by
    cilium_py.operator.schemas, the same documents as the repository's operator/crds/*.yaml
    (a unit test keeps the files equal to them), so they need no data files and work from
    an editable install, a wheel or a zipapp alike. With a directory, every *.yaml in it
    (sorted by name), each document a CustomResourceDefinition."""
    if directory is None:
        from cilium_py.operator.schemas import definitions

        return definitions()
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"CRD directory {folder} does not exist")
    out = []
    for path in sorted(folder.glob("*.yaml")):
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
        for i, doc in enumerate(docs):
            _check(doc, f"{path} document {i + 1}")
            out.append(doc)
    if not out:
        raise ValueError(f"{folder} holds no CustomResourceDefinitions (*.yaml)")
    return out


def install_crds(kube: Kube, crds: list[dict], *, timeout: float = 60.0) -> dict[str, str]:
    """Creates or updates each CRD, then waits until every one is Established. Returns
    {name: "created" | "updated" | "unchanged"}. Idempotent. Raises ApiError when the API
    server refuses one (its .retryable says whether to retry) and CRDError when one is not
    established within `timeout` seconds or its names are not accepted."""
    for i, crd in enumerate(crds):
        _check(crd, f"CRD {i + 1}")
    results = {crd["metadata"]["name"]: _apply(kube, crd) for crd in crds}
    deadline = time.monotonic() + timeout
    for name in results:
        _wait_established(kube, name, deadline, timeout)
    return results


def _check(doc, where: str) -> None:
    if not isinstance(doc, dict) or doc.get("kind") != CRD_KIND or doc.get("apiVersion") != CRD_API_VERSION:
        raise ValueError(f"{where}: not a {CRD_API_VERSION} {CRD_KIND}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a {CRD_KIND} needs metadata.name")


def _apply(kube: Kube, crd: dict) -> str:
    name = crd["metadata"]["name"]
    for _ in range(_CONFLICT_RETRIES):
        current = kube.get_or_none(CRD_KIND, name)
        if current is None:
            try:
                kube.create(CRD_KIND, crd)
                return CREATED
            except ApiError as e:
                if e.conflict:       # created by someone else meanwhile: compare with theirs
                    continue
                raise
        body = copy.deepcopy(crd)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            would_be = _dry_run_replace(kube, body)
            if would_be.get("spec") == current.get("spec"):
                return UNCHANGED
            kube.replace(CRD_KIND, body)
            return UPDATED
        except ApiError as e:
            if e.conflict:           # changed meanwhile: decide again on the new version
                continue
            raise
    raise ApiError(409, "Conflict", f"gave up after {_CONFLICT_RETRIES} conflicting writes", f"install CRD {name}")


def _dry_run_replace(kube: Kube, body: dict) -> dict:
    name = body["metadata"]["name"]
    return kube.request("PUT", resource(CRD_KIND).path(None, name), body=body, query={"dryRun": "All"},
                        what=f"update {CRD_KIND} {name} (dry run)")


def _conditions(crd: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in (crd.get("status") or {}).get("conditions") or []}


def _wait_established(kube: Kube, name: str, deadline: float, timeout: float) -> None:
    pause = threading.Event()
    while True:
        conditions = _conditions(kube.get(CRD_KIND, name))
        established = conditions.get("Established", {})
        if established.get("status") == "True":
            return
        names = conditions.get("NamesAccepted", {})
        if names.get("status") == "False":
            raise CRDError(f"CRD {name}: names not accepted: {names.get('message') or names.get('reason')}",
                           retryable=False)
        if time.monotonic() >= deadline:
            detail = established.get("message") or established.get("reason") or "no Established condition yet"
            raise CRDError(f"CRD {name} was not established within {timeout:g} s ({detail})", retryable=True)
        pause.wait(0.1)
