"""The cluster's X.509: a CA, node keys and CSRs, node certificates, fingerprints.

All of it through ``cryptography``. Keys are EC P-256. The CA is self-signed
(``BasicConstraints(ca=True, path_length=0)``, key usage keyCertSign/cRLSign). A node
certificate carries the node name as CN, the node's address (IP or DNS name) as SAN,
and both ``serverAuth`` and ``clientAuth`` extended key usages: the same certificate
serves the agent's TLS, authenticates the node as a client, and can be handed to
QEMU's ``tls-creds-x509`` (which wants a server cert on the incoming side and a
client cert on the outgoing side).

Fingerprints are SHA-256 over the DER form, as lowercase hex without separators.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migrate.cluster.errors import TrustError

#: Lifetimes (days): the CA outlives its node certificates.
CA_DAYS = 3650
NODE_DAYS = 825
#: An agent name: what a node certificate's CN carries.
MAX_NAME = 63
#: Clock skew tolerated between nodes when a certificate starts (backdated by this).
_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class NodeKey:
    """A private key and the CSR made with it (both PEM)."""

    key_pem: bytes
    csr_pem: bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """A private key from PEM; raises :class:`TrustError` if it is not an EC key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"not a private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TrustError("the private key is not an EC key")
    return key


def load_cert(pem: bytes) -> x509.Certificate:
    """One certificate from PEM; raises :class:`TrustError` on anything else."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise TrustError(f"not a PEM certificate: {exc}") from exc


def load_cert_der(der: bytes) -> x509.Certificate:
    """One certificate from DER (as a TLS handshake hands it over)."""
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise TrustError(f"not a DER certificate: {exc}") from exc


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER form, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def fingerprint_der(der: bytes) -> str:
    """SHA-256 of a DER certificate as a TLS handshake hands it over."""
    return hashlib.sha256(der).hexdigest()


def common_name(cert: x509.Certificate | x509.CertificateSigningRequest) -> str:
    """The subject's CN ("" when there is none)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def san_for(host: str) -> x509.GeneralName:
    """The SAN entry for an address's host part: an IP address or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def create_ca(cluster_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed cluster CA and its key."""
    key = new_private_key()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "livemig"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"livemig cluster CA {cluster_name}"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_csr(name: str, host: str) -> NodeKey:
    """A new node key and a CSR for ``name`` (CN) at ``host`` (SAN)."""
    key = new_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([san_for(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return NodeKey(key_pem=key_to_pem(key), csr_pem=csr.public_bytes(serialization.Encoding.PEM))


def load_csr(pem: bytes) -> x509.CertificateSigningRequest:
    """A CSR from PEM whose self-signature holds; raises :class:`TrustError`."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise TrustError(f"not a PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise TrustError("the certificate request's signature does not hold")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise TrustError("the certificate request's key is not an EC key")
    return csr


def sign_node(
    csr: x509.CertificateSigningRequest,
    name: str,
    host: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    """A node certificate for ``name`` at ``host`` from ``csr``'s public key.

    The subject and SAN are set here from the checked name and address, never copied
    from the request, so a CSR cannot ask for more than the node it is for.
    """
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise TrustError("the certificate request's key is not an EC key")
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([san_for(host)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``ca_cert`` signed ``cert`` (signature and issuer name)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def check_node_cert(cert: x509.Certificate, ca_cert: x509.Certificate, key_pem: bytes) -> None:
    """Raise :class:`TrustError` unless ``cert`` is signed by ``ca_cert`` and matches the key."""
    if not issued_by(cert, ca_cert):
        raise TrustError("the node certificate is not signed by the cluster CA")
    public = load_key(key_pem).public_key()
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, fmt) != public.public_bytes(enc, fmt):
        raise TrustError("the node certificate does not match the node key")
