#!/bin/sh
# boxd initramfs /init: load the virtio modules, mount the root, hand over.
#
# Two modes, chosen on the kernel command line:
# - a boxd guest (default): root is the virtio-blk disk (root=/dev/vda), init is systemd;
# - the emulated KVM host (boxd.testhost=DIR): root is the build machine's own file system
#   shared read-only over virtiofs (tag "hostroot"), DIR is shared read-write (tag
#   "scratch") at the same path, and DIR/init.sh runs as PID 1.
# Any failure powers the machine off with a message instead of hanging at a prompt.

export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    # Through the kernel log too: its console writes are synchronous, a tty write
    # could still sit in a buffer when the power goes.
    echo "<2>boxd-init: $*" >/dev/kmsg
    echo "boxd-init: $*" >/dev/console
    # Tell boxd's VMM this was a failed boot, not a poweroff (0xE1 on its debug port).
    /bin/boxd-boot-failed
    echo o >/proc/sysrq-trigger
    sleep 5
}

root=/dev/vda
init=/lib/systemd/systemd
testhost=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        init=*) init="${arg#init=}" ;;
        boxd.testhost=*) testhost="${arg#boxd.testhost=}" ;;
    esac
done

mode=guest
[ -n "$testhost" ] && mode=testhost
while read -r module; do
    insmod "/lib/modules/$module.ko" || fail "insmod $module failed"
done <"/modules/$mode.list"

if [ "$mode" = testhost ]; then
    mount -t virtiofs -o ro hostroot /newroot || fail "cannot mount the host root over virtiofs"
    mount -t virtiofs scratch "/newroot$testhost" || fail "cannot mount the scratch share at $testhost"
    init="$testhost/init.sh"
else
    # The disk appears once virtio_blk has probed; bounded wait (30 s) for slow hosts.
    tries=0
    while [ ! -b "$root" ]; do
        tries=$((tries + 1))
        [ "$tries" -gt 3000 ] && fail "root device $root did not appear"
        usleep 10000
    done
    mount -t ext4 -o rw,noatime,noinit_itable "$root" /newroot || fail "cannot mount $root"
fi

mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot "$init"
