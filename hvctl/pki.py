"""hvctl's certificate authority for libvirt's TLS transport (``qemu+tls``), made with ``cryptography``.

libvirt's TLS wants three things (libvirt.org/kbase/tlscerts.html): a CA both sides trust, a server certificate on
each host naming it as the client dials it (subjectAltName: GnuTLS checks it), and a client certificate for the
controller. hvctl keeps its CA and its client identity in the state dir, made once:

    STATE_DIR/pki/ca/cakey.pem          the CA's key (0600; it never leaves this machine)
    STATE_DIR/pki/ca/cacert.pem
    STATE_DIR/pki/client/cacert.pem     the client's ``pkipath``: libvirt's file names, so a host's URI is
    STATE_DIR/pki/client/clientcert.pem   qemu+tls://ADDRESS/system?pkipath=STATE_DIR/pki/client
    STATE_DIR/pki/client/clientkey.pem  (0600)

``server_pair`` issues a host's certificate and key, which ``host prepare --tls`` installs where libvirtd looks for
them by default. Key usages and purposes are the ones libvirt's certificate checks require of each kind (CA: cert
signing; server: serverAuth; client: clientAuth; both: digitalSignature and keyEncipherment). RSA 2048, as
libvirt's own guide does. ``cryptography`` is imported where it is used, so that only the commands that make or read
certificates load it.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hvctl.paths import replace_atomically

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

CA_DAYS = 3650
LEAF_DAYS = 825
CLIENT_CN = "hvctl-controller"
ORGANISATION = "hvctl"


@dataclass(frozen=True)
class ServerPair:
    cert_pem: str
    key_pem: str


class Authority:
    def __init__(self, root: Path) -> None:
        self.root = root  # STATE_DIR/pki

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def pkipath(self) -> Path:
        """The directory a ``qemu+tls`` URI's ``pkipath`` names: cacert.pem, clientcert.pem, clientkey.pem."""
        return self.root / "client"

    def tls_uri(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"qemu+tls://{host}/system?pkipath={self.pkipath}"

    def ca_pem(self) -> str:
        self.ensure()
        return (self.ca_dir / "cacert.pem").read_text()

    def existing_ca_pem(self) -> str | None:
        """The CA's certificate if there is one yet, without making it (a dry run changes nothing)."""
        try:
            return (self.ca_dir / "cacert.pem").read_text()
        except FileNotFoundError:
            return None

    def ensure(self) -> None:
        """The CA and the controller's client certificate, made on first use (under a lock, so two commands
        racing make one CA)."""
        if (self.pkipath / "clientkey.pem").exists():
            return
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (self.pkipath / "clientkey.pem").exists():
                return
            from cryptography import x509
            from cryptography.x509.oid import ExtendedKeyUsageOID

            for d in (self.ca_dir, self.pkipath):
                d.mkdir(mode=0o700, exist_ok=True)
            if not (self.ca_dir / "cakey.pem").exists():
                key = _new_key()
                name = _name("hvctl fleet CA")
                cert = _builder(name, name, key, CA_DAYS).add_extension(
                    x509.BasicConstraints(ca=True, path_length=0), critical=True,
                ).add_extension(_usage(cert_sign=True), critical=True).add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False,
                )
                _put(self.ca_dir / "cacert.pem", _cert_pem(_sign(cert, key)), 0o644)
                _put(self.ca_dir / "cakey.pem", _key_pem(key), 0o600)
            client = self._issue(CLIENT_CN, ExtendedKeyUsageOID.CLIENT_AUTH, [])
            _put(self.pkipath / "cacert.pem", (self.ca_dir / "cacert.pem").read_text(), 0o644)
            _put(self.pkipath / "clientcert.pem", client.cert_pem, 0o644)
            _put(self.pkipath / "clientkey.pem", client.key_pem, 0o600)  # last: its presence means done

    def server_pair(self, address: str) -> ServerPair:
        """A certificate and key for the host reached as ``address`` (an IP address or a DNS name)."""
        from cryptography import x509
        from cryptography.x509.oid import ExtendedKeyUsageOID

        self.ensure()
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(address))
        except ValueError:
            alt = x509.DNSName(address)
        return self._issue(address, ExtendedKeyUsageOID.SERVER_AUTH, [alt])

    def _issue(self, common_name: str, purpose: x509.ObjectIdentifier, alt: list[x509.GeneralName]) -> ServerPair:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca_key = serialization.load_pem_private_key((self.ca_dir / "cakey.pem").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((self.ca_dir / "cacert.pem").read_bytes())
        key = _new_key()
        builder = _builder(_name(common_name), ca_cert.subject, key, LEAF_DAYS).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True,
        ).add_extension(_usage(cert_sign=False), critical=True).add_extension(
            x509.ExtendedKeyUsage([purpose]), critical=False,
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return ServerPair(_cert_pem(_sign(builder, ca_key)), _key_pem(key))  # type: ignore[arg-type]


def _new_key() -> RSAPrivateKey:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    # libvirt matches tls_allowed_dn_list against "O=...,CN=..." in this order.
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANISATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: RSAPrivateKey, days: int) -> x509.CertificateBuilder:
    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # a host's clock a little behind
            .not_valid_after(now + datetime.timedelta(days=days)))


def _usage(cert_sign: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(digital_signature=not cert_sign, key_encipherment=not cert_sign, content_commitment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _sign(builder: x509.CertificateBuilder, key: RSAPrivateKey) -> x509.Certificate:
    from cryptography.hazmat.primitives import hashes

    return builder.sign(key, hashes.SHA256())


def _cert_pem(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: RSAPrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption()).decode()


def _put(path: Path, text: str, mode: int) -> None:
    replace_atomically(path, text.encode(), mode)
