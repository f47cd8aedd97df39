"""The cluster's X.509: CA, node certificates usable by TLS servers and clients alike."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from migrate.cluster import pki
from migrate.cluster.errors import TrustError


def _node(
    name: str = "a", host: str = "198.19.0.1"
) -> tuple[x509.Certificate, x509.Certificate, bytes]:
    ca, ca_key = pki.create_ca("test")
    node = pki.make_csr(name, host)
    cert = pki.sign_node(pki.load_csr(node.csr_pem), name, host, ca, ca_key)
    return ca, cert, node.key_pem


def test_ca_is_a_self_signed_ca() -> None:
    ca, _key = pki.create_ca("test")
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert pki.issued_by(ca, ca)
    assert len(pki.fingerprint(ca)) == 64


def test_node_cert_names_the_node_serves_and_authenticates() -> None:
    ca, cert, key_pem = _node("a", "198.19.0.1")
    assert pki.common_name(cert) == "a"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.19.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    pki.check_node_cert(cert, ca, key_pem)


def test_dns_names_go_into_the_san_as_dns() -> None:
    _ca, cert, _key = _node("b", "node-b.example")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["node-b.example"]


def test_a_csr_cannot_choose_its_own_name() -> None:
    ca, ca_key = pki.create_ca("test")
    node = pki.make_csr("evil", "10.0.0.1")
    cert = pki.sign_node(pki.load_csr(node.csr_pem), "b", "198.19.0.2", ca, ca_key)
    assert pki.common_name(cert) == "b"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.19.0.2")]


def test_foreign_ca_and_foreign_key_are_refused() -> None:
    ca, cert, key_pem = _node()
    other_ca, _ = pki.create_ca("other")
    assert not pki.issued_by(cert, other_ca)
    with pytest.raises(TrustError, match="not signed by the cluster CA"):
        pki.check_node_cert(cert, other_ca, key_pem)
    with pytest.raises(TrustError, match="does not match the node key"):
        pki.check_node_cert(cert, ca, pki.make_csr("a", "198.19.0.1").key_pem)


def test_damaged_pem_is_a_trust_error() -> None:
    _ca, cert, _key = _node()
    pem = bytearray(pki.cert_pem(cert))
    pem[100] ^= 0x01
    with pytest.raises(TrustError):
        pki.load_cert(bytes(pem))
    with pytest.raises(TrustError):
        pki.load_csr(
            b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        )
