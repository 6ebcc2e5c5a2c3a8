"""The k8s tier: the agent's and the operator's Kubernetes code against a real
kube-apiserver (cilium_py.lab.kube), started once per test session and stopped after it.

The peers are built by `make setup`; a missing binary fails the run with CI=true and
skips outside CI, like a missing capability in the privileged tiers."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.conftest import IN_CI


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.k8s)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    from cilium_py.lab.kube import ControlPlaneError, KubeControlPlane, tool

    try:
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl"):
            tool(name)
    except ControlPlaneError as e:
        if IN_CI:
            pytest.fail(f"k8s tier cannot run in CI: {e}", pytrace=False)
        pytest.skip(str(e))
    plane = KubeControlPlane(str(tmp_path_factory.mktemp("kube")))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube(control_plane):
    client = control_plane.admin()
    yield client
    client.close()


@pytest.fixture
def namespace(kube):
    """A fresh namespace per test, deleted after it (the namespace controller removes
    what is left in it)."""
    name = "t-" + uuid.uuid4().hex[:8]
    kube.create("Namespace", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    kube.delete("Namespace", name, missing_ok=True)


@pytest.fixture(scope="module")
def cilium_crds(control_plane):
    """Our CRDs installed (idempotent: a module whose tests delete them gets them back)."""
    from cilium_py.operator.crds import install_crds, load_crds

    kube = control_plane.admin()
    try:
        install_crds(kube, load_crds())
    finally:
        kube.close()


@pytest.fixture
def proxy(control_plane):
    from tests.k8s.tcpproxy import TcpProxy

    p = TcpProxy("127.0.0.1", control_plane.api_port)
    yield p
    p.close()
