"""`coach cloud certs DIR`: a development CA, a server certificate and a client certificate.

    DIR/ca.pem  ca.key                 the CA (keep ca.key offline in anything but a lab)
    DIR/server.pem  server.key         SAN: localhost, 127.0.0.1 (+ --host/--ip); for --tls-cert/--tls-key
    DIR/client.pem  client.key         CN = --client-name; for mutual TLS (server: --client-ca DIR/ca.pem)

Keys are EC P-256, written 0600. Everything is written to a temporary directory beside DIR and
renamed into place, so DIR is either complete or untouched.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

from coach_runtime.errors import UserError

FILES = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, metavar="DIR", help="output directory (must not exist, or be empty)")
    p.add_argument("--host", action="append", default=[], help="extra DNS name for the server certificate")
    p.add_argument("--ip", action="append", default=[], help="extra IP address for the server certificate")
    p.add_argument("--client-name", default="coach-edge", help="common name of the client certificate")
    p.add_argument("--days", type=int, default=365, help="validity in days")
    p.add_argument("--force", action="store_true", help="replace the files of an existing DIR")


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "COACH dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_cn, key, issuer_cn, issuer_key, days, *, ca=False, sans=None, server=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(_name(subject_cn)).issuer_name(_name(issuer_cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_dev_certs(out: Path, hosts=(), ips=(), client_name: str = "coach-edge", days: int = 365) -> None:
    """Write the six files of the module doc into the (existing, empty) directory `out`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    sans = [x509.DNSName(h) for h in dict.fromkeys(["localhost", *hosts])]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in dict.fromkeys(["127.0.0.1", *ips])]
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert("COACH dev CA", ca_key, "COACH dev CA", ca_key, days, ca=True)
    server = _cert("localhost", server_key, "COACH dev CA", ca_key, days, sans=sans, server=True)
    client = _cert(client_name, client_key, "COACH dev CA", ca_key, days)

    def write(name: str, data: bytes, secret: bool) -> None:
        fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    pem = serialization.Encoding.PEM
    for name, key, cert in (("ca", ca_key, ca), ("server", server_key, server), ("client", client_key, client)):
        write(f"{name}.pem", cert.public_bytes(pem), secret=False)
        write(f"{name}.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), secret=True)


def run(args) -> int:
    out: Path = args.dir
    if args.days < 1:
        raise UserError(f"--days must be at least 1, got {args.days}")
    for a in args.ip:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise UserError(f"--ip '{a}' is not an IP address") from None
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UserError(f"{out}: not empty; pick a new directory or pass --force to replace its certificates")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"{parent}: no such directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        os.chmod(tmp, 0o700)
        make_dev_certs(tmp, args.host, args.ip, args.client_name, args.days)
        if out.is_dir() and any(out.iterdir()):  # --force: swap the old directory out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
            os.replace(out, old / "d")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            if out.is_dir():
                out.rmdir()
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for f in FILES:
        print(out / f)
    print(f"serve with: coach cloud serve --tls-cert {out}/server.pem --tls-key {out}/server.key "
          f"--client-ca {out}/ca.pem ...")
    return 0
