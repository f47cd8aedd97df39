"""Asking QEMU about CPUs over QMP: its named models, and a running QEMU's host CPU.

:class:`QemuCpuProbe` starts ``qemu-system-x86_64 -machine none ... -S`` under TCG in a
temporary directory, connects with ``qemu.qmp.QMPClient`` and always kills the process
and removes the directory on exit. The async functions are the core; ``load_catalog``
and ``host_from_qmp`` are thin synchronous facades for the CLI.

Model expansions come from ``query-cpu-model-expansion type=full``: under TCG QEMU
reports each model's definition, except that TCG switches ``vme`` off in every model,
so a catalogue never lists ``vme`` (a baseline then adds ``+vme`` explicitly).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient, QMPError

from cpumodel import flags as F
from cpumodel.errors import CpuParseError, QemuProbeError
from cpumodel.host import HostCpu, SourceKind
from cpumodel.inputfile import read_input_json
from cpumodel.models import GuestModel, ModelCatalog

log = logging.getLogger(__name__)

DEFAULT_QEMU = "qemu-system-x86_64"
CATALOG_FORMAT = 1
_START_TIMEOUT_S = 20.0
_COMMAND_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class QemuCpuDefinition:
    """One entry of ``query-cpu-definitions``."""

    name: str
    alias_of: str | None
    migration_safe: bool
    static: bool
    deprecated: bool
    unavailable_features: tuple[str, ...]


@dataclass(frozen=True)
class ModelExpansion:
    """A ``query-cpu-model-expansion`` answer: model name and all its properties."""

    name: str
    props: Mapping[str, Any]

    @property
    def flags(self) -> frozenset[str]:
        """Canonical CPUID flags switched on (aliases such as ``sse3`` are skipped)."""
        return frozenset(k for k, v in self.props.items() if v is True and k in F.QEMU_FLAGS)


@dataclass(frozen=True)
class QmpHostView:
    """A running QEMU's view: its host CPU (what ``-cpu host``/``max`` expands to) and
    which named models it could run (``unavailable_features`` empty)."""

    host: HostCpu
    accelerator: str
    definitions: tuple[QemuCpuDefinition, ...]


class QmpCpuSession:
    """CPU queries over a connected QMP client."""

    def __init__(self, client: QMPClient) -> None:
        self._client = client

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command with a deadline; raises QemuProbeError."""
        try:
            # asyncio.timeout, not 3.11's wait_for: that one can swallow a cancellation.
            async with asyncio.timeout(_COMMAND_TIMEOUT_S):
                return await self._client.execute(command, arguments)
        except (QMPError, TimeoutError) as exc:
            raise QemuProbeError(f"QMP {command} failed: {exc}") from exc

    async def version(self) -> str:
        """QEMU's version as "major.minor.micro"."""
        answer = await self.execute("query-version")
        q = answer["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']}"

    async def kvm_enabled(self) -> bool:
        """Whether this QEMU runs with KVM."""
        answer = await self.execute("query-kvm")
        return bool(answer.get("enabled"))

    async def definitions(self) -> list[QemuCpuDefinition]:
        """Every CPU model QEMU offers, with what the current accelerator lacks for it."""
        answer = await self.execute("query-cpu-definitions")
        return [
            QemuCpuDefinition(
                name=d["name"],
                alias_of=d.get("alias-of"),
                migration_safe=bool(d.get("migration-safe", False)),
                static=bool(d.get("static", False)),
                deprecated=bool(d.get("deprecated", False)),
                unavailable_features=tuple(d.get("unavailable-features", ())),
            )
            for d in answer
        ]

    async def expand(
        self, model: str, props: Mapping[str, object] | None = None, kind: str = "full"
    ) -> ModelExpansion:
        """``query-cpu-model-expansion`` of ``model`` (kind "full" or "static")."""
        spec: dict[str, object] = {"name": model}
        if props:
            spec["props"] = dict(props)
        answer = await self.execute("query-cpu-model-expansion", {"type": kind, "model": spec})
        return ModelExpansion(name=answer["model"]["name"], props=answer["model"]["props"])


class QemuCpuProbe:
    """A throw-away QEMU (no machine, paused, TCG) to ask about CPU models.

    ``async with QemuCpuProbe() as session: ...``; raises QemuProbeError carrying the
    command line and QEMU's output when QEMU does not come up.
    """

    def __init__(
        self,
        binary: str = DEFAULT_QEMU,
        accel: str = "tcg",
        machine: str = "none",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.accel = accel
        self.machine = machine
        self.extra_args = tuple(extra_args)
        self._tmpdir: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._client: QMPClient | None = None
        self.argv: tuple[str, ...] = ()

    @property
    def pid(self) -> int | None:
        """The QEMU process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def workdir(self) -> Path | None:
        """The temporary directory (QMP socket, QEMU's log) while the probe is open."""
        return self._tmpdir

    def output(self) -> str:
        """The tail of QEMU's stdout/stderr so far (warnings about filtered features)."""
        if self._tmpdir is None:
            return ""
        try:
            return (self._tmpdir / "qemu.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def __aenter__(self) -> QmpCpuSession:
        self._tmpdir = Path(tempfile.mkdtemp(prefix="livemig-cpuprobe-"))
        socket_path = self._tmpdir / "qmp.sock"
        self.argv = (
            self.binary,
            "-machine", self.machine,
            "-accel", self.accel,
            "-nodefaults",
            "-display", "none",
            "-S",
            *self.extra_args,
            "-qmp", f"unix:{socket_path},server=on,wait=off",
        )  # fmt: skip
        try:
            with open(self._tmpdir / "qemu.log", "wb") as log_file:
                self._process = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            await self._wait_for_socket(socket_path)
            self._client = QMPClient("livemig-cpuprobe")
            async with asyncio.timeout(_START_TIMEOUT_S):
                await self._client.connect(str(socket_path))
        except BaseException as exc:
            output = self.output()
            await self._cleanup()
            if isinstance(exc, (OSError, QMPError, TimeoutError)):
                raise QemuProbeError(
                    f"QEMU did not come up: {exc}; {output.strip()[-300:]}".strip(),
                    argv=self.argv,
                    output=output,
                ) from exc
            raise
        return QmpCpuSession(self._client)

    async def _wait_for_socket(self, socket_path: Path) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        assert self._process is not None
        while not socket_path.exists():
            if self._process.returncode is not None:
                raise QemuProbeError(
                    f"QEMU exited with status {self._process.returncode}: "
                    f"{self.output().strip()[-300:]}",
                    argv=self.argv,
                    output=self.output(),
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no QMP socket after {_START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.02)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._cleanup()

    async def _cleanup(self) -> None:
        try:
            if self._client is not None:
                try:
                    async with asyncio.timeout(5.0):
                        await self._client.disconnect()
                except (QMPError, OSError, TimeoutError) as exc:
                    log.debug("QMP disconnect failed: %s", exc)
                self._client = None
            if self._process is not None and self._process.returncode is None:
                self._process.kill()
                await self._process.wait()
            self._process = None
        finally:
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None


def _model_from_expansion(definition: QemuCpuDefinition, expansion: ModelExpansion) -> GuestModel:
    props = expansion.props
    return GuestModel(
        name=definition.name,
        vendor=str(props.get("vendor", "")),
        flags=expansion.flags,
        family=_int_or_none(props.get("family")),
        model=_int_or_none(props.get("model")),
        stepping=_int_or_none(props.get("stepping")),
        model_id=str(props.get("model-id", "")),
        alias_of=definition.alias_of,
        migration_safe=definition.migration_safe,
    )


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def probe_catalog(binary: str = DEFAULT_QEMU) -> ModelCatalog:
    """Every named x86 model of ``binary``, fully expanded; raises QemuProbeError."""
    async with QemuCpuProbe(binary) as session:
        version = await session.version()
        models: dict[str, GuestModel] = {}
        for definition in await session.definitions():
            # host needs KVM, and base is QEMU's empty static model: neither is a guest model.
            if definition.name in ("host", "base"):
                continue
            expansion = await session.expand(definition.name)
            models[definition.name] = _model_from_expansion(definition, expansion)
    return ModelCatalog(qemu_version=version, models=models, binary=binary)


def default_cache_dir() -> Path:
    """``$LIVEMIG_CACHE_DIR``, else ``$XDG_CACHE_HOME/livemig``, else ``~/.cache/livemig``."""
    if os.environ.get("LIVEMIG_CACHE_DIR"):
        return Path(os.environ["LIVEMIG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "livemig"


def _binary_identity(binary: str) -> str:
    """Resolved path, size, mtime and ``--version`` line of a QEMU binary."""
    resolved = shutil.which(binary)
    if resolved is None:
        raise QemuProbeError(f"QEMU binary '{binary}' not found", argv=(binary,))
    real = os.path.realpath(resolved)
    try:
        st = os.stat(real)
        version = subprocess.run(
            [real, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        raise QemuProbeError(f"cannot run {real} --version: {exc}", argv=(real,)) from exc
    return f"{CATALOG_FORMAT}:{real}:{st.st_size}:{st.st_mtime_ns}:{version}"


def _cache_path(binary: str, cache_dir: Path) -> Path:
    digest = hashlib.sha256(_binary_identity(binary).encode()).hexdigest()[:16]
    return cache_dir / "cpumodel" / f"qemu-models-{digest}.json"


def load_catalog(
    binary: str = DEFAULT_QEMU, cache_dir: Path | None = None, refresh: bool = False
) -> ModelCatalog:
    """The model catalogue of ``binary``, from the cache (keyed by the binary's path, size,
    mtime and version) or by probing QEMU; raises QemuProbeError."""
    path = _cache_path(binary, cache_dir or default_cache_dir())
    if not refresh and path.is_file():
        try:
            return ModelCatalog.from_dict(read_input_json(path))
        except (OSError, ValueError, CpuParseError) as exc:
            log.warning("ignoring unreadable CPU model cache %s: %s", path, exc)
    catalog = asyncio.run(probe_catalog(binary))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(catalog.to_dict(), indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot cache CPU models in %s: %s", path, exc)
    return catalog


def host_from_expansion(
    props: Mapping[str, Any], name: str, source: SourceKind = SourceKind.QMP
) -> HostCpu:
    """A host CPU from the props of a ``host``/``max`` expansion; raises CpuParseError."""
    flags = frozenset(k for k, v in props.items() if v is True and k in F.QEMU_FLAGS)
    if not flags:
        raise CpuParseError("QMP CPU expansion has no CPUID flags switched on")
    tsc_hz = _int_or_none(props.get("tsc-frequency"))  # 0: QEMU does not know it
    if tsc_hz is not None and tsc_hz < 0:
        raise CpuParseError(f"QMP CPU expansion has a negative tsc-frequency ({tsc_hz} Hz)")
    model_id = str(props.get("model-id", ""))
    return HostCpu(
        name=name or model_id or "qmp-host",
        vendor=str(props.get("vendor", "")),
        flags=F.apply_dependencies(flags),
        source=source,
        family=_int_or_none(props.get("family")),
        model=_int_or_none(props.get("model")),
        stepping=_int_or_none(props.get("stepping")),
        model_name=model_id,
        tsc_khz=tsc_hz // 1000 if tsc_hz else None,
    )


async def host_view_from_qmp_async(socket_path: str, name: str = "") -> QmpHostView:
    """Ask a running QEMU (QMP unix socket) what its host CPU is; raises QemuProbeError."""
    client = QMPClient("livemig-cpu-show")
    try:
        async with asyncio.timeout(_START_TIMEOUT_S):
            await client.connect(socket_path)
    except (QMPError, OSError, TimeoutError) as exc:
        raise QemuProbeError(f"cannot connect to QMP socket {socket_path}: {exc}") from exc
    try:
        session = QmpCpuSession(client)
        kvm = await session.kvm_enabled()
        model = "host" if kvm else "max"
        expansion = await session.expand(model)
        host = host_from_expansion(expansion.props, name or Path(socket_path).stem)
        definitions = tuple(await session.definitions())
    finally:
        try:
            async with asyncio.timeout(5.0):
                await client.disconnect()
        except (QMPError, OSError, TimeoutError) as exc:
            log.debug("QMP disconnect failed: %s", exc)
    return QmpHostView(host=host, accelerator="kvm" if kvm else "tcg", definitions=definitions)


def host_view_from_qmp(socket_path: str, name: str = "") -> QmpHostView:
    """Synchronous :func:`host_view_from_qmp_async`."""
    return asyncio.run(host_view_from_qmp_async(socket_path, name))


async def host_from_qmp_async(socket_path: str, name: str = "") -> HostCpu:
    """The host CPU a running QEMU (QMP socket) offers guests; raises QemuProbeError.

    Under KVM that is ``-cpu host`` as KVM allows it on that host, the right input for
    :func:`cpumodel.check_migration` when the engine already talks to both QEMUs.
    """
    return (await host_view_from_qmp_async(socket_path, name)).host
