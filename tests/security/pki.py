"""A throwaway PKI for TLS tests: a CA, a server certificate (localhost, 127.0.0.1), a client
certificate signed by the CA, and a client certificate from an unrelated CA."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
           *, ca: bool = False, sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        # One identity per service, used as server and as client certificate (mTLS between services).
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("fashion-test-ca", ca_key, _name("fashion-test-ca"), ca_key, ca=True)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue("localhost", server_key, ca.subject, ca_key, sans=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server_cert, server_key_path = _write(folder, "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert, client_key_path = _write(
        folder, "client", _issue("fashion-client", client_key, ca.subject, ca_key), client_key)
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_cert, rogue_key_path = _write(
        folder, "rogue", _issue("intruder", rogue_key, _name("rogue-ca"), rogue_ca_key), rogue_key)
    return Pki(ca_path, server_cert, server_key_path, client_cert, client_key_path, rogue_cert, rogue_key_path)


def renew_server_certificate(pki: Pki, folder: Path) -> tuple[Path, Path, int]:
    """A new server certificate and key from the same CA (as cert-manager renews one), written to
    `folder` as tls.crt and tls.key; returns their paths and the new serial number."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.with_suffix(".key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue("localhost", key, ca.subject, ca_key, sans=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert_path, key_path = _write(folder, "tls", cert, key)
    return cert_path, key_path, cert.serial_number


def mount_version(mount: Path, version: str) -> None:
    """Make `mount`/current point at `mount`/<version>, as a Kubernetes Secret volume changes: a new link
    renamed over the old one, in one step."""
    (mount / "next").symlink_to(version)
    os.replace(mount / "next", mount / "current")


def renew_carelessly(pki: Pki, mount: Path) -> int:
    """A renewal that first lands half-done: the new key beside the old certificate (`mount`/half, made
    current, from `mount`/v1), the good pair in `mount`/v2 (not yet current). Returns v2's serial number."""
    _, second_key, second_serial = renew_server_certificate(pki, mount / "v2")
    (mount / "half").mkdir()
    (mount / "half" / "tls.crt").write_bytes((mount / "v1" / "tls.crt").read_bytes())
    (mount / "half" / "tls.key").write_bytes(second_key.read_bytes())
    mount_version(mount, "half")
    return second_serial
