#!/usr/bin/env python3
"""Test certificates for the cloud endpoint's certificate clients, made with `cryptography`
(independent of the Rust code under test). Writes into the directory given:

  ca.pem               the CA that issues the gateway's and the clients' certificates
  server.pem/.key      the gateway (CN and DNS name "lockbridge")
  broker.pem/.key      an MQTT broker (CN "localhost", DNS name localhost, IP 127.0.0.1)
  client.pem/.key      a client, CN "ops", valid now
  expired.pem/.key     a client, CN "ops", expired yesterday
  other.pem/.key       a client, CN "ops", issued by another CA
  pinned.pem/.key      a self-signed client, CN "tablet"; pinned.sha256 = SHA-256 of its key

Keys are P-256, PKCS#8 PEM, mode 0600.
"""
import datetime
import hashlib
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def cert(subject_key, cn, issuer_key, issuer_cn, not_before, not_after, ca=False, eku=None, dns=None,
         ip=None):
    b = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(name(issuer_cn))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if dns:
        names = [x509.DNSName(dns)]
        if ip:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def write(out, stem, certificate, key=None):
    with open(os.path.join(out, stem + ".pem"), "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path = os.path.join(out, stem + ".key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )


def main(out):
    os.makedirs(out, exist_ok=True)
    key = lambda: ec.generate_private_key(ec.SECP256R1())
    ca_key, other_ca_key = key(), key()
    ca = cert(ca_key, "lockbridge test CA", ca_key, "lockbridge test CA", NOW - DAY, NOW + 30 * DAY, ca=True)
    write(out, "ca", ca)
    server_key = key()
    write(out, "server", cert(server_key, "lockbridge", ca_key, "lockbridge test CA", NOW - DAY,
                              NOW + 30 * DAY, eku=ExtendedKeyUsageOID.SERVER_AUTH, dns="lockbridge"), server_key)
    broker_key = key()
    write(out, "broker", cert(broker_key, "localhost", ca_key, "lockbridge test CA", NOW - DAY,
                              NOW + 30 * DAY, eku=ExtendedKeyUsageOID.SERVER_AUTH, dns="localhost",
                              ip="127.0.0.1"), broker_key)
    client_key = key()
    write(out, "client", cert(client_key, "ops", ca_key, "lockbridge test CA", NOW - DAY, NOW + 30 * DAY,
                              eku=ExtendedKeyUsageOID.CLIENT_AUTH), client_key)
    expired_key = key()
    write(out, "expired", cert(expired_key, "ops", ca_key, "lockbridge test CA", NOW - 30 * DAY, NOW - DAY,
                               eku=ExtendedKeyUsageOID.CLIENT_AUTH), expired_key)
    other_key = key()
    write(out, "other", cert(other_key, "ops", other_ca_key, "lockbridge test CA", NOW - DAY, NOW + 30 * DAY,
                             eku=ExtendedKeyUsageOID.CLIENT_AUTH), other_key)
    pinned_key = key()
    write(out, "pinned", cert(pinned_key, "tablet", pinned_key, "tablet", NOW - DAY, NOW + 30 * DAY,
                              eku=ExtendedKeyUsageOID.CLIENT_AUTH), pinned_key)
    spki = pinned_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with open(os.path.join(out, "pinned.sha256"), "w") as f:
        f.write(hashlib.sha256(spki).hexdigest() + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
