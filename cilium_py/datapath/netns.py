"""Named network namespaces (/run/netns/NAME, as `ip netns` makes them) and the few things
done inside one that netlink does not cover: sysctls and running a process.

setns(2) moves only the calling thread, so `entered()` is safe in a threaded agent as long
as the block does not hand work to other threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess

from pyroute2 import netns as _netns

NETNS_DIR = "/var/run/netns"


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def is_root(name: str) -> bool:
    """True when the named namespace is the root network namespace under another name (a
    bind mount of it in /var/run/netns): nothing may attach there. Compared with PID 1's
    namespace where we may look at it (not inside some containers), and always with the
    namespace this process was started in, which is the machine's for the agent."""
    mine = os.stat(path(name))
    for ref in ("/proc/1/ns/net", f"/proc/{os.getpid()}/ns/net"):
        try:
            other = os.stat(ref)
        except OSError:
            continue
        if (mine.st_dev, mine.st_ino) == (other.st_dev, other.st_ino):
            return True
    return False


def create(name: str) -> None:
    _netns.create(name)


def remove(name: str) -> None:
    """Removes the namespace if it exists; its devices go with it."""
    if exists(name):
        _netns.remove(name)


def list_names(prefix: str = "") -> list[str]:
    return sorted(n for n in _netns.listnetns() if n.startswith(prefix))


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str):
    """Runs the block with this thread inside the namespace, then returns it to the one it
    was in. Per thread: pyroute2's pushns/popns share one stack between threads, so
    parallel probes would restore each other's namespaces."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path(name), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def write_sysctls(name: str, values: dict[str, str | int]) -> None:
    """Writes net.* sysctls of one namespace: /proc/sys/net resolves to the namespace of
    the thread that opens it."""
    with entered(name):
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(str(value))


def run(name: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Runs a command inside the namespace (a child process that joins it before exec)."""
    return subprocess.run(argv, preexec_fn=lambda: _netns.setns(name), **kwargs)


def popen(name: str, argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(argv, preexec_fn=lambda: _netns.setns(name), **kwargs)
