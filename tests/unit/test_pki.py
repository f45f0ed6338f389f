"""hvctl's CA for qemu+tls (hvctl.pki): what libvirt's certificate checks require of each certificate, checked with
`openssl verify` and cryptography's parser; modes; one CA however often it is asked for."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from hvctl.ops.prepare import tls_steps
from hvctl.pki import Authority


def load(text: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(text.encode())


def test_the_ca_client_and_server_certificates_chain_and_carry_what_libvirt_checks(tmp_path: Path) -> None:
    authority = Authority(tmp_path / "pki")
    assert authority.existing_ca_pem() is None
    authority.ensure()
    ca = load(authority.ca_pem())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign

    server = authority.server_pair("198.18.9.2")
    by_name = authority.server_pair("host-a.example")
    (tmp_path / "server.pem").write_text(server.cert_pem)
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(authority.pkipath / "cacert.pem"),
                               "-purpose", "sslserver", str(tmp_path / "server.pem")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(authority.ca_dir / "cacert.pem"), "-purpose",
                               "sslclient", str(authority.pkipath / "clientcert.pem")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr

    cert = load(server.cert_pem)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.IPAddress) == [ipaddress.ip_address("198.18.9.2")]
    assert load(by_name.cert_pem).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["host-a.example"]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    client = load((authority.pkipath / "clientcert.pem").read_text())
    assert client.subject.rfc4514_string() == "CN=hvctl-controller,O=hvctl"  # libvirt prints it O=hvctl,CN=...
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]

    for key in (authority.ca_dir / "cakey.pem", authority.pkipath / "clientkey.pem"):
        assert key.stat().st_mode & 0o777 == 0o600
    assert {p.name for p in authority.pkipath.iterdir()} == {"cacert.pem", "clientcert.pem", "clientkey.pem"}
    assert authority.tls_uri("198.18.9.2") == f"qemu+tls://198.18.9.2/system?pkipath={authority.pkipath}"
    assert authority.tls_uri("fd00::2").startswith("qemu+tls://[fd00::2]/system")


def test_the_ca_is_made_once(tmp_path: Path) -> None:
    first = Authority(tmp_path / "pki")
    first.ensure()
    again = Authority(tmp_path / "pki")
    again.ensure()
    assert again.ca_pem() == first.ca_pem()


def test_a_dry_run_of_the_tls_steps_makes_no_ca_and_no_key(tmp_path: Path) -> None:
    """The steps are built before anything runs; the certificate and key only when the install action runs."""
    authority = Authority(tmp_path / "pki")
    certificates, listener = tls_steps(authority, "198.18.9.2")
    assert certificates.check_command() == "false"  # no CA yet: no host can have it
    assert not (tmp_path / "pki").exists()
    assert "16514" in listener.check_command()
    action, stdin = certificates.action_command()
    # The key goes on stdin, never on the command line (which the host's other users can read in ps).
    assert "PRIVATE KEY" not in action and "/etc/pki/libvirt/private/serverkey.pem" in action
    assert stdin is not None and "BEGIN RSA PRIVATE KEY" in stdin
    assert "sha256sum" in certificates.check_command()  # the CA the action made
