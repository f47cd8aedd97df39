"""The test guest: a Debian cloud kernel plus an initramfs built by ``scripts/``.

``ensure_guest()`` returns a cached build, rebuilding when any input changed: the
build script, the init, the memdirty source, the kernel package that
``linux-image-cloud-amd64`` currently depends on, and the busybox/openssl binaries
copied in. ``python -m lab.guest build`` is what ``make`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.errors import GuestBuildError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
BUILD_SCRIPT = SCRIPTS / "build-guest.sh"
GUEST_SOURCES = (
    BUILD_SCRIPT,
    SCRIPTS / "guest" / "init",
    SCRIPTS / "guest" / "memdirty.c",
    SCRIPTS / "guest" / "diskpattern.c",
)
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs paths, and what they were built from."""

    kernel: Path
    initrd: Path
    kernel_version: str
    key: str


def cache_dir() -> Path:
    """Where guests are cached: ``$LIVEMIG_CACHE_DIR`` or ``<repo>/.cache``."""
    env = os.environ.get("LIVEMIG_CACHE_DIR")
    return Path(env) if env else REPO_ROOT / ".cache"


def resolve_kernel_package() -> str:
    """The versioned kernel package the cloud metapackage depends on.

    Raises :class:`GuestBuildError` if apt knows no such package (even after an
    ``apt-get update``, which is tried once when running as root).
    """
    for attempt in range(2):
        result = subprocess.run(
            ["apt-cache", "depends", KERNEL_METAPACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
        for line in result.stdout.splitlines():
            name = line.split(":", 1)[-1].strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
                return name
        if attempt == 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
    raise GuestBuildError(
        f"apt knows no {KERNEL_METAPACKAGE}: is a Debian 12 apt source configured? "
        f"({result.stderr.strip() or 'no Depends line'})"
    )


def _input_key(kernel_package: str) -> str:
    digest = hashlib.sha256(kernel_package.encode())
    for path in GUEST_SOURCES:
        digest.update(path.read_bytes())
    for tool in ("busybox", "openssl"):
        exe = shutil.which(tool)
        if exe is None:
            raise GuestBuildError(f"{tool} is not installed (run scripts/setup-system.sh)")
        digest.update(Path(exe).read_bytes())
    return digest.hexdigest()[:16]


def _cached(directory: Path, key: str) -> GuestImage | None:
    kernel, initrd, version = (directory / n for n in ("vmlinuz", "initrd.img", "kernel-version"))
    if all(p.is_file() for p in (kernel, initrd, version)):
        return GuestImage(kernel, initrd, version.read_text().strip(), key)
    return None


def ensure_guest(rebuild: bool = False) -> GuestImage:
    """Return the test guest, building it first if it is missing or stale.

    Raises :class:`GuestBuildError` with the build's last output lines on failure.
    """
    root = cache_dir() / "guest"
    kernel_package = resolve_kernel_package()
    key = _input_key(kernel_package)
    target = root / key
    if not rebuild and (image := _cached(target, key)) is not None:
        return image
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=root))
    try:
        result = subprocess.run(
            [str(BUILD_SCRIPT), str(staging), kernel_package, str(cache_dir() / "debs")],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise GuestBuildError(f"guest build failed (exit {result.returncode}): {tail}")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    image = _cached(target, key)
    if image is None:
        raise GuestBuildError(f"guest build left no kernel/initrd in {target}")
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.guest")
    parser.add_argument("action", choices=["build", "path"])
    parser.add_argument("--rebuild", action="store_true")
    args = parser.parse_args(argv)
    try:
        image = ensure_guest(rebuild=args.rebuild)
    except GuestBuildError as exc:
        print(f"livemig: error: {exc}", file=sys.stderr)
        return 1
    print(f"guest {image.key}: kernel {image.kernel_version}, {image.kernel}, {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
