"""Which accelerator can run guests here: KVM only if a real boot proves it.

On these machines ``/dev/kvm`` exists but a stock guest kernel hangs on it, so the
device node proves nothing. The probe boots the test guest under KVM with a
deadline and takes KVM only if init prints its first line; the answer is cached per
(boot, QEMU binary, guest) because a failing probe costs the whole deadline.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.guest import GuestImage, cache_dir
from lab.qemu import QemuProcess
from migrate.errors import QemuError
from migrate.vmspec import Accelerator, RamBackendKind, VMSpec

KVM_DEVICE = Path("/dev/kvm")
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator to use, the CPU model that goes with it, and why."""

    accelerator: Accelerator
    cpu_model: str
    reason: str


TCG_CHOICE_CPU = "qemu64"


def kvm_device_status(device: Path = KVM_DEVICE) -> str | None:
    """None if ``device`` opens and speaks the KVM API; otherwise why not."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return f"{device}: KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != _KVM_API_VERSION:
        return f"{device}: KVM API version {version}, expected {_KVM_API_VERSION}"
    return None


def _cache_key(guest: GuestImage) -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    stat = os.stat(qemu) if os.path.exists(qemu) else None
    raw = f"{boot_id}|{qemu}|{stat.st_mtime_ns if stat else 0}|{guest.key}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


async def boot_probe(guest: GuestImage, timeout: float) -> str | None:
    """Boot ``guest`` under KVM; None if init started within ``timeout`` s, else why not."""
    spec = VMSpec(
        name="kvm-probe",
        memory_mib=128,
        cpu_model="qemu64",
        accelerator=Accelerator.KVM,
        kernel=guest.kernel,
        initrd=guest.initrd,
        append="console=ttyS0 quiet panic=-1",
        ram_backend=RamBackendKind.ANONYMOUS,
    )
    try:
        async with QemuProcess(spec, role="probe", launch_timeout=timeout) as vm:
            await vm.console.wait_for(r"LIVEMIG INIT", timeout)
    except QemuError as exc:
        return f"a guest under KVM did not reach init within {timeout:.0f} s ({exc})"
    return None


async def choose_accelerator(guest: GuestImage, timeout: float = 10.0) -> AccelChoice:
    """KVM if the device works and a probe boot succeeds, else TCG. Cached per boot."""
    if (why := kvm_device_status()) is not None:
        return AccelChoice(Accelerator.TCG, TCG_CHOICE_CPU, why)
    cache = cache_dir() / "accel" / f"{_cache_key(guest)}.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        return AccelChoice(Accelerator(data["accelerator"]), data["cpu_model"], data["reason"])
    why = await boot_probe(guest, timeout)
    if why is None:
        choice = AccelChoice(Accelerator.KVM, "qemu64", "a guest booted under KVM")
    else:
        choice = AccelChoice(Accelerator.TCG, TCG_CHOICE_CPU, why)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({**asdict(choice), "accelerator": choice.accelerator.value}))
    return choice


def main() -> int:
    from lab.guest import ensure_guest

    choice = asyncio.run(choose_accelerator(ensure_guest()))
    print(f"{choice.accelerator.value} (-cpu {choice.cpu_model}): {choice.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
