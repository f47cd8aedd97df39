"""A throwaway cluster PKI for tests, made by the cluster's own code (migrate.cluster.pki).

Node certificates: signed by the CA, CN = node name, SAN = the node's address
(IP or DNS), EKU serverAuth + clientAuth. Files as in a node's state dir:
``ca.pem``, ``node.pem``, ``node-key.pem``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from migrate.cluster import pki
from migrate.tls import NodeCredentials


@dataclass
class ThrowawayCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "test-cluster-ca") -> ThrowawayCa:
        cert, key = pki.create_ca(name)
        return cls(key, cert)

    def issue(self, state_dir: Path, node: str, address: str) -> NodeCredentials:
        """Write ``ca.pem``, ``node.pem`` and ``node-key.pem`` for ``node`` into ``state_dir``."""
        request = pki.make_csr(node, address)
        cert = pki.sign_node(pki.load_csr(request.csr_pem), node, address, self.cert, self.key)
        state_dir.mkdir(parents=True, exist_ok=True)
        creds = NodeCredentials.from_state_dir(state_dir)
        creds.ca.write_bytes(pki.cert_pem(self.cert))
        creds.cert.write_bytes(pki.cert_pem(cert))
        creds.key.write_bytes(request.key_pem)
        creds.key.chmod(0o600)
        return creds
