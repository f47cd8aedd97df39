"""Host CPUs as the hosts' libvirt daemons describe them (``livemig cpu ... --libvirt``).

``virConnectGetCapabilities`` gives the host's own CPU (``/capabilities/host/cpu``:
model, vendor, features, as libvirt's cpu_map names them); with a virtualization
type, ``virConnectGetDomainCapabilities`` gives what that hypervisor can hand a
guest (its ``host-model``: under TCG, QEMU's emulated CPU rather than the silicon).
The XML is read by :mod:`cpumodel` like any libvirt description file.
"""

from __future__ import annotations

from typing import Any

from cpumodel import CpuModelError, HostCpu
from cpumodel.errors import CpuParseError
from cpumodel.libvirt import ModelResolver
from cpumodel.sources import parse_hosts
from migrate.libvirt.conn import close_quietly, open_connection, require_libvirt, translate


def host_cpu_xml(conn: Any, virt_type: str | None = None) -> str:
    """The capabilities XML (``virt_type`` None) or that type's domain capabilities.
    Raises :class:`~migrate.libvirt.LibvirtError`."""
    lv = require_libvirt()
    try:
        if virt_type is None:
            return str(conn.getCapabilities())
        return str(conn.getDomainCapabilities(None, "x86_64", None, virt_type, 0))
    except lv.libvirtError as exc:
        call = "getCapabilities" if virt_type is None else f"getDomainCapabilities({virt_type})"
        raise translate(exc, call) from exc


def host_name(conn: Any, fallback: str) -> str:
    """The daemon's host name, or ``fallback`` when it will not say."""
    lv = require_libvirt()
    try:
        return str(conn.getHostname()) or fallback
    except lv.libvirtError:
        return fallback


def host_cpu_of(conn: Any, label: str, resolve: ModelResolver,
                virt_type: str | None = None) -> HostCpu:  # fmt: skip
    """The one host CPU ``conn``'s daemon describes, named after its host. Raises
    :class:`CpuModelError` (naming ``label``) or :class:`~migrate.libvirt.LibvirtError`."""
    name = host_name(conn, label)
    text = host_cpu_xml(conn, virt_type)
    try:
        hosts = parse_hosts(text, name, resolve)
    except CpuModelError as exc:
        raise CpuParseError(f"{label}: {exc}") from exc
    if len(hosts) != 1:
        raise CpuParseError(f"{label}: libvirt described {len(hosts)} CPUs, expected one")
    return hosts[0]


def host_cpus(
    uris: list[str], resolve: ModelResolver, virt_type: str | None = None
) -> list[HostCpu]:
    """One host CPU per daemon URI (each connection closed after reading)."""
    hosts = []
    for uri in uris:
        conn = open_connection(uri)
        try:
            hosts.append(host_cpu_of(conn, uri, resolve, virt_type))
        finally:
            close_quietly(conn)
    return hosts
