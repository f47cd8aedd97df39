"""An agent's address: ``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from migrate.errors import ConfigError

#: The port an agent listens on when an address names none.
DEFAULT_PORT = 7443
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The agent's base URL."""
        return f"https://{self}"

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_address(text: str) -> Address:
    """``HOST:PORT`` → :class:`Address`; raises :class:`ConfigError` on anything else."""
    if not isinstance(text, str) or not text or len(text) > 300:
        raise ConfigError(f"not an address (HOST:PORT): {text!r}")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"not an address ([IPv6]:PORT): {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"address needs a port (HOST:PORT): {text!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"address port must be 1-65535: {text!r}")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ConfigError(f"address host is neither an IP nor a DNS name: {text!r}") from None
        host = host.lower()
    return Address(host, int(port_text))
