"""A throwaway certificate authority for tests against a TLS Kafka (cryptography, PEM files).

The secure test broker (kafka_node.KafkaCluster(secure=True)) and the clients under test read the
same PEM files, as in production (the kafka role's PEM key stores).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    """Paths of a CA certificate and of one server's PKCS#8 key and certificate."""

    ca: Path
    key: Path
    cert: Path
    keystore: Path  # key + certificate, Kafka's PEM key store


def make_pki(into: Path, name: str = "localhost", ca_name: str = "keplerlog test CA") -> Pki:
    """Create a CA and a server certificate for `name` and 127.0.0.1 under `into`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    into.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def build(
        subject: str,
        issuer: x509.Name,
        public: ec.EllipticCurvePublicKey,
        signer: ec.EllipticCurvePrivateKey,
        ca: bool,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            sans = [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca_cert = build(ca_name, ca_subject, ca_key.public_key(), ca_key, True)
    cert = build(name, ca_subject, key.public_key(), ca_key, False)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    out = Pki(into / "ca.crt", into / "node.key", into / "node.crt", into / "keystore.pem")
    out.ca.write_bytes(ca_cert.public_bytes(pem))
    out.key.write_bytes(key_pem)
    out.key.chmod(0o600)
    out.cert.write_bytes(cert.public_bytes(pem))
    out.keystore.write_bytes(key_pem + cert.public_bytes(pem))
    out.keystore.chmod(0o600)
    return out
