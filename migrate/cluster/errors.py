"""The cluster's errors (state directory, PKI, join keys, tokens, agent calls).

::

    LivemigError
     └── ClusterError        anything about the cluster; one line for the operator
          ├── StateError       the state directory: missing, already a member, bad file (.path)
          ├── JoinKeyError     a join key that is malformed or damaged (integrity check)
          ├── TokenError       a join token refused: unknown, expired or used (.reason)
          ├── TrustError       a certificate that does not chain to the cluster CA, or a
          │                    CA whose fingerprint is not the one in the join key
          └── AgentError       an agent call failed (.address, .status; status None when
               │               the agent was not reached)
               └── AgentRefused  the agent answered and refused (HTTP 4xx, .reason)
"""

from __future__ import annotations

from pathlib import Path

from migrate.errors import LivemigError


class ClusterError(LivemigError):
    """Root of the cluster's errors."""


class StateError(ClusterError):
    """The state directory cannot be used as asked (``path`` names the file)."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class JoinKeyError(ClusterError):
    """A join key that is not one: wrong prefix or version, bad encoding, failed check."""


class TokenError(ClusterError):
    """A join token refused; ``reason`` is ``unknown``, ``expired`` or ``used``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class TrustError(ClusterError):
    """A certificate or CA that this cluster does not trust."""


class AgentError(ClusterError):
    """A call to an agent failed; ``status`` is the HTTP status when one came back."""

    def __init__(self, message: str, address: str, status: int | None = None) -> None:
        super().__init__(message)
        self.address = address
        self.status = status


class AgentRefused(AgentError):
    """The agent answered with a refusal (4xx); ``reason`` is its one-line error."""

    def __init__(self, message: str, address: str, status: int, reason: str) -> None:
        super().__init__(message, address, status)
        self.reason = reason
