"""`customs-edge certs`: a development certificate authority for the broker's mutual TLS.

  customs-edge certs init DIR                       DIR/ca.key (0600) + DIR/ca.crt, valid 10 years, and an
                                                    empty revocation list DIR/ca.crl
  customs-edge certs issue NAME --role ROLE --dir DIR [--days 365] [--san HOST ...]
                                                    DIR/NAME.key (0600) + DIR/NAME.crt, signed by DIR's CA
  customs-edge certs revoke NAME --dir DIR          add NAME.crt to DIR/ca.crl (copy it to the broker's
                                                    crlfile and reload mosquitto: that certificate is refused)
  customs-edge certs crl --dir DIR                  sign DIR/ca.crl again, valid CRL_DAYS more (a CRL past
                                                    its next update makes the broker refuse every client)

The certificate's common name is the identity the broker knows (configs/broker: use_identity_as_username),
so the name carries the role: a device certificate's CN is its device_id; hubs are named hub-*, operators
op-* (each one listed as a `user` in configs/broker/acl), and a device name may not start with either, so a
device certificate can never match a hub's or an operator's ACL entry. `--role broker` makes the broker's
server certificate (its names in subjectAltName: NAME plus every --san).

With an existing CA, skip this command: have it sign a CSR with CN = the name above, extendedKeyUsage
clientAuth (serverAuth for the broker), and point tls_ca / cafile at that CA's certificate.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from customs_edge.core.errors import CustomsEdgeError

Role = Literal["device", "hub", "operator", "broker"]
ROLES: tuple[Role, ...] = ("device", "hub", "operator", "broker")
PREFIX = {"hub": "hub-", "operator": "op-"}  # the name a role's certificate must carry (the ACL maps it)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a device_id; the broker's name may hold dots too
DEFAULT_DAYS = 365
CA_DAYS = 3650
CRL_DAYS = 365  # a CRL's validity: run `certs crl` (or revoke) again within it


class CertError(CustomsEdgeError):
    pass


def init_ca(directory: Path, days: int = CA_DAYS, name: str = "customs-edge development CA") -> Path:
    """A new CA in `directory`: ca.key (0600) and ca.crt. Refuses to replace an existing CA."""
    directory = Path(directory)
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if key_path.exists():
        raise CertError(f"{key_path} exists: a CA is never replaced (use another directory)")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(subject, subject, key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_crl(directory)
    return cert_path


def _ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"no usable CA in {directory} ({type(exc).__name__}): run `customs-edge certs init "
                        f"{directory}` first") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{directory / 'ca.key'}: not an EC key made by `certs init`")
    return ca_key, ca_cert


def write_crl(directory: Path, revoke: x509.Certificate | None = None) -> Path:
    """DIR/ca.crl signed again (valid CRL_DAYS), with the serials it listed and `revoke`'s added."""
    directory = Path(directory)
    ca_key, ca_cert = _ca(directory)
    path = directory / "ca.crl"
    listed: list[x509.RevokedCertificate] = []
    if path.exists():
        try:
            listed = list(x509.load_pem_x509_crl(path.read_bytes()))
        except ValueError as exc:
            raise CertError(f"{path}: not a readable CRL ({exc}); restore it from backup") from None
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
         .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=CRL_DAYS)))
    for r in listed:
        b = b.add_revoked_certificate(r)
    if revoke is not None and revoke.serial_number not in {r.serial_number for r in listed}:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(revoke.serial_number)
                                      .revocation_date(now).build())
    crl = b.sign(ca_key, hashes.SHA256())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)
    return path


def revoke(directory: Path, name: str) -> Path:
    """Add NAME.crt (issued by DIR's CA) to DIR/ca.crl; returns the CRL's path."""
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / f"{name}.crt").read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"cannot read {directory / f'{name}.crt'} ({type(exc).__name__}): revoke a certificate"
                        " this CA directory issued") from None
    return write_crl(directory, cert)


def issue(directory: Path, name: str, role: Role, days: int = DEFAULT_DAYS, sans: list[str] | None = None,
          *, replace: bool = False) -> tuple[Path, Path]:
    """NAME.crt and NAME.key (0600) in `directory`, signed by its CA; returns (cert, key)."""
    directory = Path(directory)
    check_name(name, role)
    if days < 1:
        raise CertError(f"--days {days}: a certificate must be valid for at least 1 day")
    ca_key, ca_cert = _ca(directory)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    if key_path.exists() and not replace:
        raise CertError(f"{key_path} exists: pass --replace to issue a new key and certificate for {name}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "broker" else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (_builder(subject, ca_cert.subject, key.public_key(), days)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if role == "broker":
        b = b.add_extension(x509.SubjectAlternativeName([_san(n) for n in [name, *(sans or [])]]), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def check_name(name: str, role: Role) -> None:
    if not NAME.match(name):
        raise CertError(f"{name!r}: a certificate name is 1-64 letters, digits, _ . - (a device's device_id)")
    prefix = PREFIX.get(role)
    if prefix and not name.startswith(prefix):
        raise CertError(f"{name!r}: a {role} certificate's name starts with {prefix!r} (the broker's ACL maps "
                        f"names to roles), e.g. {prefix}{name}")
    if role == "device" and name.startswith(tuple(PREFIX.values())):
        raise CertError(f"{name!r}: a device's name must not start with {' or '.join(map(repr, PREFIX.values()))}"
                        " (those names are hubs and operators in the broker's ACL)")


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The key in PEM, created 0600 (never readable by others, not even for a moment)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)


def cmd_certs(args: argparse.Namespace) -> int:
    if args.action == "init":
        print(f"CA certificate: {init_ca(Path(args.dir), args.days or CA_DAYS)} (key beside it, mode 0600)")
    elif args.action == "revoke":
        print(f"revocation list: {revoke(Path(args.dir), args.name)} (copy it to the broker's crlfile, reload)")
    elif args.action == "crl":
        print(f"revocation list: {write_crl(Path(args.dir))} (valid {CRL_DAYS} days; copy it to the broker)")
    else:
        cert, key = issue(Path(args.dir), args.name, args.role, args.days or DEFAULT_DAYS, args.san,
                          replace=args.replace)
        print(f"{args.role} certificate: {cert}\nkey (mode 0600): {key}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("certs", help="a development CA and the certificates of devices, hubs, operators")
    csub = c.add_subparsers(dest="action", required=True)
    i = csub.add_parser("init", help="create a CA in DIR (ca.key 0600, ca.crt)")
    i.add_argument("dir", help="where ca.key (0600) and ca.crt are written; an existing CA is never replaced")
    i.add_argument("--days", type=int, help=f"CA validity (default {CA_DAYS})")
    s = csub.add_parser("issue", help="a key and certificate signed by the CA in --dir")
    s.add_argument("name", help="device_id, hub-NAME, op-NAME, or the broker's host name")
    s.add_argument("--role", choices=ROLES, required=True,
                   help="device (CN = device_id), hub (hub-*), operator (op-*) or broker (a server certificate)")
    s.add_argument("--dir", default=".", help="the CA's directory (default: .)")
    s.add_argument("--days", type=int, help=f"validity (default {DEFAULT_DAYS})")
    s.add_argument("--san", action="append", default=[], help="another broker host name or IP (repeatable)")
    s.add_argument("--replace", action="store_true", help="replace NAME's key and certificate (renewal)")
    r = csub.add_parser("revoke", help="add NAME's certificate to the CA's revocation list (DIR/ca.crl)")
    r.add_argument("name", help="the certificate's name (NAME.crt in --dir)")
    r.add_argument("--dir", default=".", help="the CA's directory (default: .)")
    cr = csub.add_parser("crl", help=f"sign the CA's revocation list again, valid {CRL_DAYS} days")
    cr.add_argument("--dir", default=".", help="the CA's directory (default: .)")
    c.set_defaults(fn=cmd_certs)
