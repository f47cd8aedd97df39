"""The strategies and policies the benchmark can ask the engine for, and the raw peers.

Policies are the engine's named presets (:mod:`migrate.presets`: livemig's own and
the peers' defaults); the engine picks each policy's controller itself. Raw peers
(:mod:`lab.raw`) run those presets as the peers' users get them, outside the
engine. The benchmark defines none. :func:`availability` tells which scenarios of a
suite this build can run.
"""

from __future__ import annotations

import shutil

from bench.errors import SuiteError
from bench.scenario import Availability
from lab.raw import RAW_PEERS, RawPeer, raw_peer
from migrate.engine import STRATEGIES
from migrate.errors import ConfigError
from migrate.libvirt.conn import require_libvirt
from migrate.policy import Policy
from migrate.presets import PRESET_NAMES, preset


def policy_named(name: str) -> Policy:
    """The engine's preset called ``name``. Raises :class:`SuiteError` if unknown."""
    try:
        return preset(name)
    except ConfigError as exc:
        raise SuiteError(str(exc), PRESET_NAMES) from exc


def raw_peer_named(name: str) -> RawPeer:
    """The raw peer of preset ``name``. Raises :class:`SuiteError` if there is none."""
    try:
        return raw_peer(name)
    except ConfigError as exc:
        raise SuiteError(str(exc), tuple(RAW_PEERS)) from exc


def libvirt_missing() -> str | None:
    """Why libvirt runs cannot happen here (the daemon, virsh, libvirt-python), or None."""
    missing = [tool for tool in ("libvirtd", "virsh", "unshare") if shutil.which(tool) is None]
    try:
        require_libvirt()
    except ConfigError:
        missing.append("libvirt-python")
    return f"missing {', '.join(missing)} (scripts/setup-system.sh)" if missing else None


def availability() -> Availability:
    return Availability(
        strategies=frozenset(STRATEGIES),
        policies=frozenset(PRESET_NAMES),
        raw_peers=frozenset(RAW_PEERS),
        libvirt_missing=libvirt_missing(),
    )
