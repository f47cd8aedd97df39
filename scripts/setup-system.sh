#!/usr/bin/env bash
# Installs the Debian 12 packages livemig needs; installs only what is missing,
# so running it again costs a dpkg query and nothing else.
set -euo pipefail

packages=(
    qemu-system-x86 qemu-utils     # the hypervisor and its tools
    iproute2 iputils-ping          # ip netns / veth / bridge / tuntap, tc tbf; ping
    busybox-static cpio kmod       # guest initramfs: userland, archive, modinfo
    openssl                        # the guest's OpenSSL workload binary
    gcc libc6-dev                  # static build of the guest's memdirty workload
    python3 python3-venv python3-dev
    ca-certificates
    libvirt-clients                # virsh + libvirt0's cpu_map: the CPU baseline we compare with
    libvirt-daemon-system libvirt-daemon-driver-qemu  # libvirtd for the libvirt strategy's lab
    libvirt-dev pkg-config         # libvirt-python builds against the system libvirt
)

missing=()
for p in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$status" = "installed" ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup-system: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
fi
echo "setup-system: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
