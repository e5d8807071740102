"""`migrate certs DIR --hosts A,B`: a CA and one certificate per host, so that
two agents can be tried with mutual TLS without an openssl recipe.

Each host's certificate is good for both ends (server and client auth) and
carries the host's name as its CN and as a DNS SAN (an IP SAN too when the
name is an address). Needs the `cryptography` package (`pip install
'migrate[tls]'`). Keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

DAYS = 365


def _write(path: str, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_certs(directory: str, hosts: list[str], days: int = DAYS,
                not_before: datetime.datetime | None = None) -> dict[str, str]:
    """Writes ca.pem (and ca.key) and HOST.pem / HOST.key for each host into
    directory; returns {name: path}. not_before moves the validity window
    (tests make expired certificates with it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("--hosts: name at least one host")
    os.makedirs(directory, exist_ok=True)
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "migrate CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": os.path.join(directory, "ca.pem"), "ca.key": os.path.join(directory, "ca.key")}
    _write(out["ca"], ca.public_bytes(serialization.Encoding.PEM))
    _write(out["ca.key"], pem_key(ca_key), private=True)
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
