"""The install manifests (operator/*.yaml) on the test session's API server, and clients
holding real tokens of the ServiceAccounts they create."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path

from cilium_py.k8s import rbac
from cilium_py.k8s.client import Kube

MANIFESTS = Path(__file__).resolve().parents[2] / "operator"
CRDS = MANIFESTS / "crds"


def _kubectl_ok(plane, *args: str):
    done = plane.kubectl(*args)
    assert done.returncode == 0, f"kubectl {' '.join(args)} failed:\n{done.stderr}"
    return done


@contextlib.contextmanager
def installed_manifests(plane):
    """The manifests applied for real, the CRDs first, and removed after: the CRDs that did
    not exist before are deleted too (and waited for)."""
    admin = plane.admin()
    try:
        preexisting = {c for c in rbac.CRD_NAMES if admin.get_or_none("CustomResourceDefinition", c)}
    finally:
        admin.close()
    try:
        _kubectl_ok(plane, "apply", "-f", str(CRDS))
        _kubectl_ok(plane, "apply", "-f", str(MANIFESTS))
        yield plane
    finally:
        plane.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", str(MANIFESTS))
        # Waited for: a CRD still terminating would meet the next test module's installer.
        created = sorted(set(rbac.CRD_NAMES) - preexisting)
        if created:
            plane.kubectl("delete", "--ignore-not-found", "--timeout=60s",
                          *(f"customresourcedefinition/{name}" for name in created))


def _kubeconfig(plane, namespace: str, name: str) -> str:
    return plane.kubeconfig_for_service_account(
        namespace, name, path=f"{plane.workdir}/sa-{uuid.uuid4().hex[:8]}.kubeconfig")


@contextlib.contextmanager
def client_as(plane, namespace: str, service_account: str):
    client = Kube(_kubeconfig(plane, namespace, service_account))
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def recording_client_as(plane, component: rbac.Component):
    """A RecordingKube with a token of the component's ServiceAccount."""
    from tests.k8s.recording import RecordingKube

    client = RecordingKube(_kubeconfig(plane, component.namespace, component.service_account))
    try:
        yield client
    finally:
        client.close()
