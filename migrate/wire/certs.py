"""`migrate certs DIR --hosts A,B`: a CA and one certificate per host, so that
two agents can be tried with mutual TLS without an openssl recipe.

Each host's certificate is good for both ends (server and client auth) and
carries the host's name as its CN and as a DNS SAN (an IP SAN too when the
name is an address). A directory that already holds a CA (ca.pem and ca.key)
keeps it: the new hosts are signed by it, so a host can be added later.
Nothing is overwritten. Needs the `cryptography` package (`pip install
'migrate[tls]'`). Keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets

DAYS = 365
# a host name as a certificate and a file name may carry it (an IP address also passes)
_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class CertsError(ValueError):
    """What `migrate certs` was asked that it cannot do, in words."""


def _write(path: str, data: bytes, private: bool = False) -> None:
    # O_EXCL: an existing file (and the mode it has) is never taken over
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def check_hosts(hosts: list[str]) -> list[str]:
    """The names as given, or CertsError naming the one that cannot be used."""
    if not hosts:
        raise CertsError("--hosts: name at least one host, e.g. --hosts src.example,dst.example")
    for h in hosts:
        try:
            ipaddress.ip_address(h)
            continue
        except ValueError:
            pass
        if not _NAME.fullmatch(h):
            raise CertsError(f"--hosts: {h!r} is not a host name (letters, digits, '.' and '-') or an IP address")
        if h == "ca":
            raise CertsError("--hosts: 'ca' is the CA's own file name (ca.pem): name the host otherwise")
    dup = sorted({h for h in hosts if hosts.count(h) > 1})
    if dup:
        raise CertsError(f"--hosts: {', '.join(dup)} named twice")
    return hosts


def write_certs(directory: str, hosts: list[str], days: int = DAYS,
                not_before: datetime.datetime | None = None) -> dict[str, str]:
    """Writes HOST.pem / HOST.key for each host into directory, signed by the
    CA there (ca.pem, ca.key), which is made first when the directory has none;
    returns {name: path} of what it wrote ("ca", "ca.key" only when it made
    them). not_before moves the validity window of what it writes (tests make
    expired certificates with it). Refuses (CertsError), before writing
    anything, a host whose files exist already."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    check_hosts(hosts)
    ca_pem, ca_key_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    have_ca = os.path.exists(ca_pem) or os.path.exists(ca_key_path)
    if have_ca and not (os.path.exists(ca_pem) and os.path.exists(ca_key_path)):
        raise CertsError(f"{directory} holds only one of ca.pem and ca.key: a CA needs both (remove the other "
                         "to make a new CA)")
    taken = [p for h in hosts for p in (os.path.join(directory, f"{h}.pem"), os.path.join(directory, f"{h}.key"))
             if os.path.exists(p)]
    if taken:
        raise CertsError(f"{taken[0]} exists: nothing was written (remove it, or name another host)")
    os.makedirs(directory, exist_ok=True)
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    out = {}
    if have_ca:
        with open(ca_pem, "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
        ca_name = ca.subject
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        # a name of its own: a certificate from another `migrate certs` CA is then
        # refused as "unable to get local issuer certificate", not as a bad signature
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"migrate CA {secrets.token_hex(4)}")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA256()))
        out = {"ca": ca_pem, "ca.key": ca_key_path}
        _write(ca_pem, ca.public_bytes(serialization.Encoding.PEM))
        _write(ca_key_path, pem_key(ca_key), private=True)
    for host in hosts:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            sans = [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName(host)]
        except ValueError:
            sans = [x509.DNSName(host)]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        out[host] = os.path.join(directory, f"{host}.pem")
        out[host + ".key"] = os.path.join(directory, f"{host}.key")
        _write(out[host], cert.public_bytes(serialization.Encoding.PEM))
        _write(out[host + ".key"], pem_key(key), private=True)
    return out
