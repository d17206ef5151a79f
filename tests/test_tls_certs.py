"""`customs-edge certs`: a development CA, and certificates whose names carry their role."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from customs_edge.cli import certs
from customs_edge.core.mqtt import Tls, cert_days_left


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "customs_edge", "certs", *args], capture_output=True, text=True,
                          timeout=120)


def test_init_and_issue_from_the_command_line(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    assert run("init", str(d)).returncode == 0
    for name, role in (("dev-a", "device"), ("hub-1", "hub"), ("op-1", "operator")):
        r = run("issue", name, "--role", role, "--dir", str(d))
        assert r.returncode == 0, r.stderr
    r = run("issue", "broker.local", "--role", "broker", "--san", "127.0.0.1", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    for key in d.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = x509.load_pem_x509_certificate((d / "ca.crt").read_bytes())
    dev = x509.load_pem_x509_certificate((d / "dev-a.crt").read_bytes())
    dev.verify_directly_issued_by(ca)
    assert dev.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-a"
    assert list(dev.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert 364.9 < cert_days_left(d / "dev-a.crt") <= 365  # default validity: one year
    broker = x509.load_pem_x509_certificate((d / "broker.local.crt").read_bytes())
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.local"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    Tls(d / "ca.crt", d / "dev-a.crt", d / "dev-a.key").context()  # loadable as a client identity


@pytest.mark.parametrize(("name", "role", "why"), [
    ("hub-1", "device", "must not start with 'hub-'"),
    ("op-x", "device", "must not start with"),
    ("main-hub", "hub", "starts with 'hub-'"),
    ("alice", "operator", "starts with 'op-'"),
    ("bad/name", "device", "letters, digits"),
])
def test_a_name_that_does_not_carry_its_role_is_refused(tmp_path: Path, name: str, role: str, why: str) -> None:
    certs.init_ca(tmp_path)
    r = run("issue", name, "--role", role, "--dir", str(tmp_path))
    assert r.returncode == 1 and why in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*-*.crt")) and not (tmp_path / f"{name}.key").exists()


def test_a_ca_or_a_key_is_never_replaced_silently(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    ca = (tmp_path / "ca.key").read_bytes()
    r = run("init", str(tmp_path))
    assert r.returncode == 1 and "never replaced" in r.stderr and (tmp_path / "ca.key").read_bytes() == ca
    certs.issue(tmp_path, "dev-a", "device")
    key = (tmp_path / "dev-a.key").read_bytes()
    r = run("issue", "dev-a", "--role", "device", "--dir", str(tmp_path))
    assert r.returncode == 1 and "--replace" in r.stderr and (tmp_path / "dev-a.key").read_bytes() == key
    assert run("issue", "dev-a", "--role", "device", "--dir", str(tmp_path), "--replace").returncode == 0
    assert (tmp_path / "dev-a.key").read_bytes() != key
    assert stat.S_IMODE((tmp_path / "dev-a.key").stat().st_mode) == 0o600


def test_issuing_without_a_ca_names_the_fix(tmp_path: Path) -> None:
    r = run("issue", "dev-a", "--role", "device", "--dir", str(tmp_path / "none"))
    assert r.returncode == 1 and "certs init" in r.stderr and "Traceback" not in r.stderr


def test_revoke_and_crl_keep_every_revoked_serial_and_name_the_fix(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    empty = x509.load_pem_x509_crl((tmp_path / "ca.crl").read_bytes())  # made with the CA: the broker can load it
    assert list(empty) == [] and empty.is_signature_valid(
        x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes()).public_key())  # type: ignore[arg-type]
    serials = []
    for name in ("dev-a", "dev-b"):
        certs.issue(tmp_path, name, "device")
        serials.append(x509.load_pem_x509_certificate((tmp_path / f"{name}.crt").read_bytes()).serial_number)
        certs.revoke(tmp_path, name)
    certs.revoke(tmp_path, "dev-a")  # twice: listed once
    assert run("crl", "--dir", str(tmp_path)).returncode == 0
    crl = x509.load_pem_x509_crl((tmp_path / "ca.crl").read_bytes())
    assert sorted(r.serial_number for r in crl) == sorted(serials)
    assert crl.next_update_utc is not None and 364 < (crl.next_update_utc - crl.last_update_utc).days <= 365
    r = run("revoke", "dev-zz", "--dir", str(tmp_path))
    assert r.returncode == 1 and "revoke a certificate this CA directory issued" in r.stderr
