#!/usr/bin/env bash
# Runs the README's two commands the way a new machine sees them: in a Debian 12 chroot
# made with mmdebstrap that holds only what a new machine of CI's kind has (Debian's
# base, git, gcc, Python, rustup with the stable toolchain copied from this machine),
# on a fresh clone of this repository. See docs/testing.md, "A fresh machine".
#
#   tests/fresh-machine.sh [DIR]      # DIR: where the chroot goes (default /var/tmp/boxd-fresh)
#
# Needs root and mmdebstrap on this machine (apt-get install mmdebstrap). Everything
# the project needs beyond that base is installed inside by `cargo xtask demo`.
# The times of both commands are printed at the end and kept in DIR/times.txt.
set -euo pipefail

root=${1:-/var/tmp/boxd-fresh}
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "run as root (the chroot, its mounts and the tests need it)" >&2; exit 2; }
command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install mmdebstrap" >&2; exit 2; }
stable=$(ls -d "$HOME"/.rustup/toolchains/stable-* 2>/dev/null | head -1)
[ -n "$stable" ] || { echo "no stable toolchain under ~/.rustup to copy" >&2; exit 2; }

cleanup() {
    for m in sys/fs/bpf sys/fs/cgroup sys dev/pts dev/shm dev proc run tmp; do
        umount -R "$root/$m" 2>/dev/null || true
    done
}
trap cleanup EXIT

if [ ! -e "$root/.made" ]; then
    rm -rf "$root"
    # A Debian 12 install: main, updates and security, as a new machine has them.
    mmdebstrap --variant=minbase \
        --include=git,ca-certificates,gcc,libc6-dev,python3,qemu-utils,curl,procps \
        bookworm "$root" \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main"
    # rustup and the stable toolchain, nothing else of this machine's Rust.
    mkdir -p "$root/root/.rustup/toolchains" "$root/root/.cargo/bin"
    cp -a "$stable" "$root/root/.rustup/toolchains/"
    printf 'version = "12"\ndefault_toolchain = "%s"\n' "$(basename "$stable")" \
        >"$root/root/.rustup/settings.toml"
    cp "$HOME/.cargo/bin/rustup" "$root/root/.cargo/bin/"
    for p in cargo rustc rustdoc rustfmt cargo-fmt cargo-clippy clippy-driver; do
        ln -sf rustup "$root/root/.cargo/bin/$p"
    done
    touch "$root/.made"
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
# The machine's own trust store: where a network's TLS goes through a proxy with its
# own root, a new machine of that network trusts it too (it is not something boxd's
# setup installs).
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
grep -q localhost "$root/etc/hosts" 2>/dev/null || echo "127.0.0.1 localhost" >>"$root/etc/hosts"
rm -rf "$root/root/boxd"
git clone -q "$repo" "$root/root/boxd"

mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"

run() {
    chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        CI="${CI:-}" bash -c "cd /root/boxd && $1"
}
: >"$root/times.txt"
for cmd in "cargo xtask demo" "cargo xtask test"; do
    echo "==> fresh machine: $cmd"
    start=$(date +%s)
    status=0
    run "$cmd" || status=$?
    took=$(( $(date +%s) - start ))
    echo "$cmd: exit $status after $((took / 60)) min $((took % 60)) s" | tee -a "$root/times.txt"
    [ "$status" = 0 ] || exit "$status"
done
cat "$root/times.txt"
