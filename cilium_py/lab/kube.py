"""A real Kubernetes control plane on this machine for the k8s tests and the lab: etcd,
kube-apiserver and kube-controller-manager, built by `make setup` from the versions pinned
in tools/go.mod (into cilium_py.defaults.TOOLS_BIN). Each is a child process known by its
pid, logging into a file under the workdir, listening on 127.0.0.1 only.

What it sets up, and why:

* Certificates (cilium_py.lab.kubepki): one CA; the API server's serving certificate for
  127.0.0.1/localhost (so a loopback proxy on another port verifies too); client
  certificates for the admin (O=system:masters) and for kube-controller-manager
  (CN=system:kube-controller-manager, which the bootstrap RBAC roles name); the
  service-account key pair. Components under test (agent, operator) authenticate with real
  ServiceAccount tokens from the TokenRequest API (`kubeconfig_for_service_account`), so
  RBAC judges them (`--authorization-mode=Node,RBAC`).
* kube-controller-manager runs only what ciliumpy relies on: EndpointSlices, namespace
  deletion, service accounts and their tokens, garbage collection (ownerReferences) and
  the root CA publisher; each controller with its own service-account credentials. It
  serves nothing (`--secure-port=0`): start() knows it works when the `default`
  ServiceAccount appears.

The advertise address. kube-apiserver publishes it as the endpoints of the `kubernetes`
Service (default/kubernetes Endpoints and EndpointSlice), which Cilium reads to give the API
server its `kube-apiserver` identity, so the tests want them real. Left unset,
kube-apiserver picks the address of the default-route interface: the machine's shared
uplink, which we must not use. 127.0.0.1, the address it really listens on, is refused:
Endpoints validation rejects loopback ("may not be in the loopback range"), the endpoint
reconciler fails every 10 s and neither the Endpoints nor the EndpointSlice ever exist.
Turning the reconciler off (`--endpoint-reconciler-type=none`) leaves them missing too.
Giving the server an address of its own would mean adding one to a root-namespace device,
which the safety rules forbid. So the server advertises ADVERTISE_ADDRESS (10.243.0.1): on
no interface, outside the lab's pod (10.244/16) and uplink (10.245/16) ranges, the service
range and the documentation ranges tests use as "world". The reconciler then runs exactly as
in a cluster (a lease, Endpoints and an EndpointSlice naming 10.243.0.1 and the secure
port), and nothing is reachable there: clients use 127.0.0.1 through their kubeconfig,
never the `kubernetes` ClusterIP. A lab that wants the address reachable can put it in a
node namespace of its own.
"""

from __future__ import annotations

import base64
import concurrent.futures
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request

from cilium_py import defaults
from cilium_py.lab.kubepki import Pki, make_pki

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADVERTISE_ADDRESS = "10.243.0.1"
ADMIN_USER = "ciliumpy-admin"

# What ciliumpy's tests and lab need of kube-controller-manager (its names as of 1.35).
CONTROLLERS = ("endpointslice-controller", "namespace-controller", "serviceaccount-controller",
               "serviceaccount-token-controller", "garbage-collector-controller",
               "root-ca-certificate-publisher-controller")

ETCD_TIMEOUT = 30.0
APISERVER_TIMEOUT = 90.0
CONTROLLER_MANAGER_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
WATCH_DRAIN_SECONDS = 2
LOG_TAIL_LINES = 30
TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")


class ControlPlaneError(RuntimeError):
    """The control plane cannot start: a peer is not built, or a component did not come up
    (the message carries the tail of its log). Retrying does not help without a change."""


def tool(name: str) -> str:
    """The path of a peer built by `make setup`; ControlPlaneError naming it when missing."""
    path = os.path.join(defaults.TOOLS_BIN, name)
    if not os.access(path, os.X_OK):
        raise ControlPlaneError(f"{path} is missing: run `make setup` (it builds the peers pinned "
                                f"in tools/go.mod into {defaults.TOOLS_BIN})")
    return path


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str, data: bytes, mode: int = 0o600) -> str:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
    return path


def write_kubeconfig(path: str, server: str, ca_file: str, credentials: dict, user: str) -> str:
    """A kubeconfig for one user; `credentials` is its `user` stanza ({"token": ..} or
    {"client-certificate": .., "client-key": ..})."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "ciliumpy",
        "clusters": [{"name": "ciliumpy", "cluster": {"server": server, "certificate-authority": ca_file}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "ciliumpy", "context": {"cluster": "ciliumpy", "user": user}}],
    }
    # JSON is YAML: every kubeconfig reader takes it.
    return _write(path, json.dumps(config, indent=1).encode())


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A test run killed hard must not leave an API server behind on a shared machine.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# PDEATHSIG fires when the *thread* that forked the child ends, not the process: a restart
# from a short-lived thread (a test's client thread, say) would take the API server with
# it. So every component is forked by this one thread, which lives as long as the process.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kube-spawner")


class Component:
    """One process of the control plane: its command line, its log file, its pid."""

    def __init__(self, name: str, argv: list[str], log: str):
        self.name, self.argv, self.log = name, argv, log
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"==== ciliumpy: start {self.starts}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = _SPAWNER.submit(
                subprocess.Popen, self.argv, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent).result()

    def stop(self, timeout: float = STOP_TIMEOUT, *, kill: bool = False) -> None:
        """SIGTERM, SIGKILL once `timeout` has passed (at once with `kill`); idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 32 * 1024))
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> ControlPlaneError:
        state = ("still running" if self.running() else
                 f"exited with status {self.proc.returncode}" if self.proc else "not started")
        return ControlPlaneError(f"{self.name} {what} ({state}); last lines of {self.log}:\n{self.log_tail()}")


class KubeControlPlane:
    """etcd + kube-apiserver + kube-controller-manager under `workdir` (certificates, etcd
    data, kubeconfigs, one log per component). start() returns once the API server is ready
    and the controller manager has made the `default` ServiceAccount; stop() ends the
    processes it started, by pid, and may be called any number of times.

    `timings` holds the seconds each component took to be ready at the last (re)start
    ("etcd", "kube-apiserver", "kube-controller-manager"), "total" for start() and
    "kube-apiserver restart" for the last restart_apiserver()."""

    def __init__(self, workdir: str, *, advertise_address: str = ADVERTISE_ADDRESS):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, mode=0o700, exist_ok=True)
        self.advertise_address = advertise_address
        self.etcd_port, self.etcd_peer_port, self.api_port = free_port(), free_port(), free_port()
        self.api_host = "127.0.0.1"
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.admin_kubeconfig = os.path.join(self.workdir, "admin.kubeconfig")
        self.timings: dict[str, float] = {}
        self.pki: Pki | None = None
        self.etcd: Component | None = None
        self.apiserver: Component | None = None
        self.controller_manager: Component | None = None
        self._lock = threading.Lock()

    @property
    def ca_file(self) -> str:
        return self.pki.ca.cert

    @property
    def start_seconds(self) -> float:
        return self.timings.get("total", 0.0)

    def components(self) -> list[Component]:
        return [c for c in (self.etcd, self.apiserver, self.controller_manager) if c is not None]

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> "KubeControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "KubeControlPlane":
        paths = {name: tool(name) for name in TOOLS}
        began = time.monotonic()
        try:
            pki = self.pki = make_pki(os.path.join(self.workdir, "pki"))
            self.timings["certificates"] = time.monotonic() - began
            write_kubeconfig(self.admin_kubeconfig, self.server, pki.ca.cert,
                             {"client-certificate": pki.admin.cert, "client-key": pki.admin.key}, ADMIN_USER)
            kcm_kubeconfig = write_kubeconfig(
                os.path.join(self.workdir, "controller-manager.kubeconfig"), self.server, pki.ca.cert,
                {"client-certificate": pki.controller_manager.cert, "client-key": pki.controller_manager.key},
                "system:kube-controller-manager")
            self.etcd = Component("etcd", self._etcd_argv(paths["etcd"]), self._log("etcd"))
            self.apiserver = Component("kube-apiserver", self._apiserver_argv(paths["kube-apiserver"]),
                                       self._log("kube-apiserver"))
            self.controller_manager = Component(
                "kube-controller-manager",
                self._controller_manager_argv(paths["kube-controller-manager"], kcm_kubeconfig),
                self._log("kube-controller-manager"))
            self.timings["etcd"] = self._start(self.etcd, self._etcd_healthy, ETCD_TIMEOUT,
                                               "did not report healthy")
            self.timings["kube-apiserver"] = self.start_apiserver()
            self.timings["kube-controller-manager"] = self._start(
                self.controller_manager, self._default_service_account, CONTROLLER_MANAGER_TIMEOUT,
                "did not create the default ServiceAccount")
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - began
        return self

    def stop(self) -> None:
        """The controller manager first and etcd last, so none outlives what it talks to."""
        with self._lock:
            for component in reversed(self.components()):
                component.stop()

    def stop_apiserver(self, *, crash: bool = False) -> None:
        """Stops kube-apiserver; etcd and the data stay. Gracefully by default, as a rolling
        restart does: open watches end cleanly (their streams just stop) within
        WATCH_DRAIN_SECONDS. With `crash`, SIGKILL: connections break mid-stream."""
        self._started(self.apiserver).stop(kill=crash)

    def start_apiserver(self) -> float:
        """Starts kube-apiserver (again, on the same port and data) and waits for /readyz;
        seconds it took."""
        return self._start(self._started(self.apiserver), self._apiserver_ready, APISERVER_TIMEOUT,
                           "did not become ready")

    def restart_apiserver(self, *, crash: bool = False) -> float:
        """Stops (see stop_apiserver) and starts kube-apiserver on the same port with the
        same data; seconds it took. Its watch cache starts over, so a watch from an older
        resourceVersion can get 410 Gone."""
        began = time.monotonic()
        self.stop_apiserver(crash=crash)
        self.start_apiserver()
        self.timings["kube-apiserver restart"] = took = time.monotonic() - began
        return took

    def _start(self, component: Component, ready, timeout: float, what: str) -> float:
        began = time.monotonic()
        component.spawn()
        deadline = began + timeout
        pause = threading.Event()
        while not ready():
            if not component.running():
                raise component.failure("exited during start")
            if time.monotonic() > deadline:
                raise component.failure(f"{what} within {timeout:.0f} s")
            pause.wait(0.05)
        return time.monotonic() - began

    @staticmethod
    def _started(component: Component | None) -> Component:
        if component is None:
            raise ControlPlaneError("the control plane was never started: call start() first")
        return component

    # -- clients ---------------------------------------------------------------------

    def admin(self, **kwargs):
        """A cilium_py.k8s.client.Kube with cluster-admin rights (system:masters)."""
        from cilium_py.k8s.client import Kube

        return Kube(self.admin_kubeconfig, **kwargs)

    def service_account_token(self, namespace: str, name: str, expiration_seconds: int = 3600) -> str:
        """A real token of ServiceAccount namespace/name (created when missing), from the
        TokenRequest API."""
        from cilium_py.k8s.client import ApiError
        from cilium_py.k8s.resources import resource

        kube = self.admin()
        try:
            try:
                kube.create("ServiceAccount", {"apiVersion": "v1", "kind": "ServiceAccount",
                                               "metadata": {"name": name, "namespace": namespace}})
            except ApiError as e:
                if not e.conflict:
                    raise
            answer = kube.request(
                "POST", resource("ServiceAccount").path(namespace, name, "token"),
                body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                      "spec": {"expirationSeconds": expiration_seconds}},
                what=f"TokenRequest for ServiceAccount {namespace}/{name}")
        finally:
            kube.close()
        return answer["status"]["token"]

    def kubeconfig_for_service_account(self, namespace: str, name: str, path: str | None = None,
                                       expiration_seconds: int = 3600) -> str:
        """Writes a kubeconfig that authenticates as ServiceAccount namespace/name with a
        bearer token (and trusts our CA); returns its path."""
        token = self.service_account_token(namespace, name, expiration_seconds)
        path = path or os.path.join(self.workdir, f"sa-{namespace}-{name}.kubeconfig")
        return write_kubeconfig(path, self.server, self.ca_file, {"token": token},
                                f"system:serviceaccount:{namespace}:{name}")

    def kubectl(self, *args: str, kubeconfig: str | None = None, input: str | None = None,
                check: bool = False, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """kubectl against this control plane, for tests and the lab (never library code)."""
        return subprocess.run([tool("kubectl"), "--kubeconfig", kubeconfig or self.admin_kubeconfig, *args],
                              input=input, capture_output=True, text=True, check=check, timeout=timeout)

    # -- etcd ------------------------------------------------------------------------

    def etcd_revision(self) -> int:
        # A range over a key nobody writes: only the header, which carries the revision.
        answer = self._etcd_post("/v3/kv/range", {"key": base64.b64encode(b"\0").decode()})
        return int(answer["header"]["revision"])

    def etcd_get(self, key: str, revision: int | None = None) -> dict:
        """etcd's answer to a range over one key (at `revision`, when given): raises
        ControlPlaneError for a revision compacted away. For tests of compaction."""
        body = {"key": base64.b64encode(key.encode()).decode()}
        if revision is not None:
            body["revision"] = str(revision)
        return self._etcd_post("/v3/kv/range", body)

    def compact_etcd(self) -> int:
        """Compacts etcd's history up to its current revision (physically); returns the
        revision. Older resourceVersions are gone from etcd afterwards (the API server's
        watch cache may still serve them until it restarts)."""
        revision = self.etcd_revision()
        self._etcd_post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def _etcd_post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as e:
            raise ControlPlaneError(f"etcd {path}: {e.code} {e.read().decode(errors='replace')}") from None

    # -- readiness -------------------------------------------------------------------

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=2) as resp:
                return json.load(resp).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _apiserver_ready(self) -> bool:
        context = ssl.create_default_context(cafile=self.pki.ca.cert)
        context.load_cert_chain(self.pki.admin.cert, self.pki.admin.key)
        try:
            with urllib.request.urlopen(self.server + "/readyz", timeout=2, context=context) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _default_service_account(self) -> bool:
        from cilium_py.k8s.client import ApiError

        kube = self.admin(timeout=5.0)
        try:
            return kube.get_or_none("ServiceAccount", "default", "default") is not None
        except ApiError:
            return False
        finally:
            kube.close()

    # -- command lines ---------------------------------------------------------------

    def _log(self, name: str) -> str:
        return os.path.join(self.workdir, f"{name}.log")

    def _etcd_argv(self, etcd: str) -> list[str]:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [etcd, "--name", "ciliumpy", "--data-dir", os.path.join(self.workdir, "etcd-data"),
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"ciliumpy={peer}", "--initial-cluster-state", "new",
                # Data for one test session on a shared machine: an fsync per write would make
                # every API request wait for the disk and buys nothing here.
                "--unsafe-no-fsync", "--log-level", "warn"]

    def _apiserver_argv(self, apiserver: str) -> list[str]:
        pki = self.pki
        return [apiserver, "--etcd-servers", self.etcd_url,
                "--bind-address", "127.0.0.1", "--secure-port", str(self.api_port),
                "--advertise-address", self.advertise_address,
                "--tls-cert-file", pki.serving.cert, "--tls-private-key-file", pki.serving.key,
                "--client-ca-file", pki.ca.cert,
                "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
                "--service-account-issuer", SERVICE_ACCOUNT_ISSUER,
                "--service-account-key-file", pki.service_account_pub,
                "--service-account-signing-key-file", pki.service_account_key,
                "--service-cluster-ip-range", SERVICE_CIDR, "--allow-privileged=true",
                # Without a grace period for watches, a graceful stop waits a minute for the
                # HTTP server to close the connections the watches hold.
                f"--shutdown-watch-termination-grace-period={WATCH_DRAIN_SECONDS}s",
                "--profiling=false"]

    def _controller_manager_argv(self, kcm: str, kubeconfig: str) -> list[str]:
        pki = self.pki
        return [kcm, "--kubeconfig", kubeconfig,
                "--controllers", ",".join(CONTROLLERS), "--use-service-account-credentials",
                "--service-account-private-key-file", pki.service_account_key,
                "--root-ca-file", pki.ca.cert, "--service-cluster-ip-range", SERVICE_CIDR,
                "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "0",
                "--profiling=false"]
