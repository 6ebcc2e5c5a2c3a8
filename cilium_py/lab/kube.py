"""A real Kubernetes control plane on loopback for the tests and the lab: etcd,
kube-apiserver and kube-controller-manager, built by `make setup` from the versions pinned
in tools/go.mod (into cilium_py.defaults.TOOLS_BIN).

What it sets up, and why:

* Certificates made here (cryptography): a CA, the API server's serving certificate for
  127.0.0.1/localhost signed by it, and the service-account signing key pair. Clients
  verify the server with the CA, as in a real cluster.
* Authentication by static tokens (`--token-auth-file`): an admin in `system:masters` for
  the tests and kube-controller-manager as `system:kube-controller-manager`. Components we
  test (agent, operator) use real ServiceAccount tokens from the TokenRequest API
  (`kubeconfig_for_service_account`), so RBAC judges them (`--authorization-mode=Node,RBAC`).
* Everything listens on 127.0.0.1 on free ports. The API server advertises 127.0.0.1,
  which Endpoints validation refuses (loopback), so its own endpoint reconciler is off
  (`--endpoint-reconciler-type=none`) and the `default/kubernetes` service has no
  endpoints here: what the agent learns from them is tested where the API server runs in a
  node namespace (the cluster issue).
* kube-controller-manager runs only the controllers the agent relies on: EndpointSlices,
  namespace deletion, service accounts and their tokens, garbage collection (ownerReferences
  of CiliumEndpoints) and the root CA publisher.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

from cilium_py import defaults

ADMIN_TOKEN_USER = "ciliumpy-admin"
SERVICE_CIDR = "10.96.0.0/16"
CONTROLLERS = ("endpointslice-controller", "namespace-controller", "serviceaccount-controller",
               "serviceaccount-token-controller", "garbage-collector-controller",
               "root-ca-certificate-publisher-controller")


class ControlPlaneError(RuntimeError):
    pass


def tool(name: str) -> str:
    path = os.path.join(defaults.TOOLS_BIN, name)
    if not os.access(path, os.X_OK):
        raise ControlPlaneError(f"{path} is missing: run `make setup` (it builds the peers pinned "
                                f"in tools/go.mod into {defaults.TOOLS_BIN})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: str, data: bytes, mode: int = 0o600) -> str:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
    return path


def make_certificates(directory: str) -> dict[str, str]:
    """CA, serving certificate for 127.0.0.1 and localhost, service-account key pair."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ciliumpy-lab-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.DNSName("kubernetes.default.svc"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("10.96.0.1"))]
    serving = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
               .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.SubjectAlternativeName(sans), critical=False)
               .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .sign(ca_key, hashes.SHA256()))
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(os.path.join(directory, "ca.crt"), ca.public_bytes(pem), 0o644),
        "cert": _write(os.path.join(directory, "apiserver.crt"), serving.public_bytes(pem), 0o644),
        "key": _write(os.path.join(directory, "apiserver.key"), pem_key(key)),
        "sa_key": _write(os.path.join(directory, "sa.key"), pem_key(sa_key)),
        "sa_pub": _write(os.path.join(directory, "sa.pub"), sa_key.public_key().public_bytes(
            pem, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644),
    }


def write_kubeconfig(path: str, server: str, ca_file: str, token: str, user: str = "user") -> str:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "ciliumpy",
        "clusters": [{"name": "ciliumpy", "cluster": {"server": server, "certificate-authority": ca_file}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "ciliumpy", "context": {"cluster": "ciliumpy", "user": user}}],
    }
    # JSON is YAML: every kubeconfig reader takes it.
    _write(path, json.dumps(config, indent=1).encode())
    return path


@dataclass
class _Process:
    name: str
    argv: list[str]
    log: str
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


@dataclass
class KubeControlPlane:
    workdir: str
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        os.makedirs(self.workdir, exist_ok=True)
        self.etcd_port, self.etcd_peer_port = free_port(), free_port()
        self.api_port, self.kcm_port = free_port(), free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self.admin_token = os.urandom(16).hex()
        self._kcm_token = os.urandom(16).hex()
        self.admin_kubeconfig = os.path.join(self.workdir, "admin.kubeconfig")
        self._processes: dict[str, _Process] = {}
        self.certs: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "KubeControlPlane":
        started = time.monotonic()
        try:
            self.certs = make_certificates(self.workdir)
            _write(os.path.join(self.workdir, "tokens.csv"),
                   f'{self.admin_token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},"system:masters"\n'
                   f'{self._kcm_token},system:kube-controller-manager,system:kube-controller-manager\n'.encode())
            write_kubeconfig(self.admin_kubeconfig, self.server, self.certs["ca"], self.admin_token, "admin")
            kcm_kubeconfig = write_kubeconfig(os.path.join(self.workdir, "kcm.kubeconfig"), self.server,
                                              self.certs["ca"], self._kcm_token, "kcm")
            self._processes = {
                "etcd": _Process("etcd", self._etcd_argv(), os.path.join(self.workdir, "etcd.log")),
                "kube-apiserver": _Process("kube-apiserver", self._apiserver_argv(),
                                           os.path.join(self.workdir, "kube-apiserver.log")),
                "kube-controller-manager": _Process("kube-controller-manager", self._kcm_argv(kcm_kubeconfig),
                                                    os.path.join(self.workdir, "kube-controller-manager.log")),
            }
            self._start("etcd", self._etcd_healthy, 30)
            self._start("kube-apiserver", self._apiserver_ready, 90)
            self._start("kube-controller-manager", self._kcm_healthy, 60)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - started
        return self

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            process = self._processes.get(name)
            if process is not None:
                process.stop()

    def __enter__(self) -> "KubeControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop_apiserver(self) -> None:
        # A graceful stop drains the long-running watches for many seconds; a test that
        # stops the API server wants it gone, as a crash would.
        self._processes["kube-apiserver"].stop(timeout=2.0)

    def start_apiserver(self) -> None:
        self._start("kube-apiserver", self._apiserver_ready, 90)

    def restart_apiserver(self) -> None:
        """Stops and starts kube-apiserver on the same port (same data): its watch cache
        starts over, so a watch from an older resourceVersion can get 410 Gone."""
        self.stop_apiserver()
        self.start_apiserver()

    def compact_etcd(self) -> int:
        """Compacts etcd's history up to its current revision; returns the revision."""
        status = self._etcd_post("/v3/kv/range", {"key": "AA=="})
        revision = int(status["header"]["revision"])
        self._etcd_post("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    # -- clients ---------------------------------------------------------------------

    def admin(self):
        from cilium_py.k8s.client import Kube

        return Kube(self.admin_kubeconfig)

    def kubeconfig_for_service_account(self, namespace: str, name: str, path: str | None = None,
                                       expiration_seconds: int = 3600) -> str:
        """A kubeconfig holding a real token of ServiceAccount namespace/name (created when
        missing), from the TokenRequest API."""
        from cilium_py.k8s.client import ApiError

        kube = self.admin()
        try:
            try:
                kube.create("ServiceAccount", {"apiVersion": "v1", "kind": "ServiceAccount",
                                               "metadata": {"name": name, "namespace": namespace}})
            except ApiError as e:
                if not e.conflict:
                    raise
            answer = kube.request(
                "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                      "spec": {"expirationSeconds": expiration_seconds}})
        finally:
            kube.close()
        path = path or os.path.join(self.workdir, f"sa-{namespace}-{name}.kubeconfig")
        return write_kubeconfig(path, self.server, self.certs["ca"], answer["status"]["token"],
                                f"{namespace}-{name}")

    def kubectl(self, *args: str, kubeconfig: str | None = None, input: str | None = None,
                check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([tool("kubectl"), "--kubeconfig", kubeconfig or self.admin_kubeconfig, *args],
                              input=input, capture_output=True, text=True, check=check, timeout=120)

    # -- internals -------------------------------------------------------------------

    def _etcd_argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        return [tool("etcd"), "--name", "ciliumpy", "--data-dir", os.path.join(self.workdir, "etcd-data"),
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"ciliumpy={peer}", "--listen-metrics-urls", "",
                "--log-level", "warn"]

    def _apiserver_argv(self) -> list[str]:
        c = self.certs
        return [tool("kube-apiserver"), "--etcd-servers", self.etcd_url,
                "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
                "--secure-port", str(self.api_port), "--endpoint-reconciler-type", "none",
                "--tls-cert-file", c["cert"], "--tls-private-key-file", c["key"],
                "--client-ca-file", c["ca"], "--token-auth-file", os.path.join(self.workdir, "tokens.csv"),
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--service-account-key-file", c["sa_pub"], "--service-account-signing-key-file", c["sa_key"],
                "--service-cluster-ip-range", SERVICE_CIDR, "--authorization-mode", "Node,RBAC",
                "--allow-privileged=true", "--cert-dir", os.path.join(self.workdir, "apiserver-certs"),
                "--v", "1"]

    def _kcm_argv(self, kubeconfig: str) -> list[str]:
        return [tool("kube-controller-manager"), "--kubeconfig", kubeconfig,
                "--authentication-kubeconfig", kubeconfig, "--authorization-kubeconfig", kubeconfig,
                "--bind-address", "127.0.0.1", "--secure-port", str(self.kcm_port),
                "--controllers", ",".join(CONTROLLERS), "--leader-elect=false",
                "--use-service-account-credentials",
                "--service-account-private-key-file", self.certs["sa_key"],
                "--root-ca-file", self.certs["ca"], "--cert-dir", os.path.join(self.workdir, "kcm-certs"),
                "--v", "1"]

    def _start(self, name: str, ready, timeout: float) -> None:
        process = self._processes[name]
        began = time.monotonic()
        process.start()
        deadline = began + timeout
        while not ready():
            if not process.running():
                raise ControlPlaneError(f"{name} exited ({process.proc.returncode if process.proc else '?'}); "
                                        f"last log lines ({process.log}):\n{process.log_tail()}")
            if time.monotonic() > deadline:
                tail = process.log_tail()
                process.stop()
                raise ControlPlaneError(f"{name} not ready after {timeout:.0f} s; last log lines "
                                        f"({process.log}):\n{tail}")
            time.sleep(0.1)
        self.timings[name] = time.monotonic() - began

    def _etcd_post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.etcd_url + path, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.load(resp)

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.etcd_url + "/health", timeout=1) as resp:
                return json.load(resp).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _https_ok(self, url: str, token: str | None = None) -> bool:
        import ssl

        context = ssl.create_default_context(cafile=self.certs["ca"])
        if url.startswith(f"https://127.0.0.1:{self.kcm_port}"):
            context = ssl._create_unverified_context()  # kcm serves a self-signed cert of its own
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _apiserver_ready(self) -> bool:
        return self._https_ok(f"{self.server}/readyz", self.admin_token)

    def _kcm_healthy(self) -> bool:
        return self._https_ok(f"https://127.0.0.1:{self.kcm_port}/healthz", self.admin_token)
