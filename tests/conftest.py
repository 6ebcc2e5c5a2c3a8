"""Fixtures shared by every tier.

Privileged tiers (bpf, netns) need root and BCC. Outside CI they skip with the reason; with
CI=true a missing capability fails the run instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_BPF_ROOT = "/sys/fs/bpf"


def _privilege_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    try:
        from cilium_py.datapath.bcc_import import import_bcc

        import_bcc()
    except Exception as e:  # noqa: BLE001
        return f"BCC unavailable: {e}"
    if not os.path.ismount("/sys/fs/bpf"):
        return "bpffs is not mounted at /sys/fs/bpf (run make setup)"
    return None


def require_privileges() -> None:
    problem = _privilege_problem()
    if problem is None:
        return
    if IN_CI:
        pytest.fail(f"privileged test cannot run in CI: {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="session")
def privileged():
    require_privileges()


@pytest.fixture(scope="session")
def unique():
    """A short token unique to this test session, for names of namespaces and pins."""
    return uuid.uuid4().hex[:6]


@pytest.fixture(scope="session")
def bpf_root(privileged, unique):
    """A bpffs directory of this session's own; removed at the end, also after failures."""
    root = os.path.join(TEST_BPF_ROOT, f"ciliumpy-test-{unique}")
    os.makedirs(root, exist_ok=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def datapath(bpf_root):
    """The datapath compiled and loaded once per session (BCC compile is ~1 s)."""
    from cilium_py.datapath import loader
    from cilium_py.datapath.config import DatapathConfig

    config = DatapathConfig(node="bpftest", bpf_root=bpf_root)
    loaded = loader.load(config)
    yield loaded
    loaded.close()
