#!/usr/bin/env bash
# Builds the livemig test guest: a Debian cloud kernel and an initramfs with busybox,
# openssl (+ its libraries), the virtio-net and virtio-blk modules and the memdirty and
# diskpattern workloads.
#
#   build-guest.sh OUTDIR KERNEL_PACKAGE DEB_CACHE_DIR
#
# Writes OUTDIR/vmlinuz and OUTDIR/initrd.img. Called by `python -m lab.guest
# build`, which decides when a rebuild is due (inputs changed) and passes the
# versioned kernel package that linux-image-cloud-amd64 currently depends on.
set -euo pipefail

out=$1
kpkg=$2
debs=$3
here=$(cd "$(dirname "$0")" && pwd)
modules=(virtio_pci virtio_net virtio_blk)   # transport + drivers; the rest follows from modinfo depends

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out" "$debs"

# apt-get download runs as _apt where it can; give it a directory it may write.
deb=$(ls "$debs/${kpkg}"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    dl=$(mktemp -d)
    chmod 777 "$dl"
    (cd "$dl" && apt-get download -q "$kpkg" >/dev/null 2>&1) || {
        rm -rf "$dl"
        echo "build-guest: apt-get download $kpkg failed (is the Debian mirror reachable?)" >&2
        exit 1
    }
    mv "$dl"/*.deb "$debs/"
    rm -rf "$dl"
    deb=$(ls "$debs/${kpkg}"_*.deb | head -n1)
fi
dpkg -x "$deb" "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")
moddir="$work/kernel/lib/modules/$kver"

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules}

# Modules in load order: each module after everything it depends on.
declare -A seen=()
order=()
add_module() {
    local name=$1 path dep
    [ -n "${seen[$name]:-}" ] && return 0
    seen[$name]=1
    path=$(find "$moddir" -name "$name.ko" -print -quit)
    [ -n "$path" ] || { echo "build-guest: module $name not in $kpkg" >&2; exit 1; }
    for dep in $(modinfo -F depends "$path" | tr ',' ' '); do
        add_module "$dep"
    done
    cp "$path" "$root/lib/modules/"
    order+=("$name")
}
for m in "${modules[@]}"; do add_module "$m"; done
printf '%s\n' "${order[@]}" > "$root/lib/modules/load-order"

# busybox and its applets.
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done

# openssl with the libraries and loader ldd names, at the same paths.
ossl=$(command -v openssl)
cp "$ossl" "$root/bin/openssl"
for lib in $(ldd "$ossl" | grep -oE '/[^ ]+'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

gcc -static -O2 -o "$root/bin/memdirty" "$here/guest/memdirty.c"
gcc -static -O2 -o "$root/bin/diskpattern" "$here/guest/diskpattern.c"
install -m 0755 "$here/guest/init" "$root/init"

cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
# Uncompressed: under TCG the kernel's own decompression costs more than loading.
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) > "$out/initrd.img"
echo "$kver" > "$out/kernel-version"
