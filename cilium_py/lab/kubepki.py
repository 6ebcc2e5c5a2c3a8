"""The certificates and keys of a one-machine control plane, made with `cryptography`.

One CA signs everything: the API server's serving certificate (127.0.0.1 and localhost, so
a loopback proxy on another port still verifies), and the client certificates of the admin
and of kube-controller-manager. The service-account key pair signs and verifies tokens.
ECDSA P-256 throughout: generating it takes microseconds, RSA takes tens of milliseconds.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class CertFiles:
    cert: str
    key: str


@dataclass(frozen=True)
class Pki:
    ca: CertFiles
    serving: CertFiles
    admin: CertFiles
    controller_manager: CertFiles
    service_account_key: str      # private, PEM: the API server signs tokens, kcm too
    service_account_pub: str      # public, PEM: the API server verifies tokens


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _write_key(path: str, key) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: str, cert: x509.Certificate) -> None:
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _sign(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, ca: bool = False,
          usages: tuple = (), sans: list | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: str) -> Pki:
    """Writes a fresh CA, certificates and keys into `directory` (created 0700)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)

    def path(name: str) -> str:
        return os.path.join(directory, name)

    ca_key = _key()
    ca_name = _name("ciliumpy-ca")
    ca_cert = _sign(ca_name, ca_key, ca_name, ca_key, ca=True)
    _write_cert(path("ca.crt"), ca_cert)
    _write_key(path("ca.key"), ca_key)

    def leaf(stem: str, subject: x509.Name, usages: tuple, sans=None) -> CertFiles:
        key = _key()
        cert = _sign(subject, key, ca_name, ca_key, usages=usages, sans=sans)
        files = CertFiles(path(f"{stem}.crt"), path(f"{stem}.key"))
        _write_cert(files.cert, cert)
        _write_key(files.key, key)
        return files

    serving = leaf("apiserver", _name("kube-apiserver"), (ExtendedKeyUsageOID.SERVER_AUTH,), sans=[
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
        # The names a pod uses for the API server through the `kubernetes` Service.
        x509.IPAddress(ipaddress.ip_address("10.96.0.1")), x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"), x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local")])
    client = (ExtendedKeyUsageOID.CLIENT_AUTH,)
    admin = leaf("admin", _name("ciliumpy-admin", "system:masters"), client)
    kcm = leaf("controller-manager", _name("system:kube-controller-manager"), client)

    sa_key = _key()
    _write_key(path("sa.key"), sa_key)
    with open(path("sa.pub"), "wb") as f:
        f.write(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    return Pki(CertFiles(path("ca.crt"), path("ca.key")), serving, admin, kcm,
               path("sa.key"), path("sa.pub"))
