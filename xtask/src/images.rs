//! `cargo xtask images`: the guest kernel, the project's initramfs and the Debian root
//! filesystem, each cached by the hash of its inputs.
//!
//! Layout under `target/images/`:
//! - `kernel-<debian version>/`: `vmlinuz`, `release` and the unpacked `lib/modules`.
//! - `initrd-<key>.img`: uncompressed newc cpio (the kernel unpacks it without a
//!   decompressor, which matters when ring 0 is emulated).
//! - `debian-<key>.tar`: the mmdebstrap output, slow to make, keyed by suite and packages.
//! - `rootfs-<key>.ext4`: the tarball plus the boxd agent, units and kernel modules.
//! - `vmlinuz`, `initrd.img`, `rootfs.ext4`: symlinks to the current ones, and
//!   `manifest.json` naming them, which the VMM tests and the test host read.

use crate::cpio;
use crate::util::{
    Step, hash_file, hash_parts, images_dir, is_root, output, run, run_quiet, symlink_force,
    write_atomic,
};
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// What the base image holds beyond minbase; DESIGN.md lists the reasons.
const ROOTFS_PACKAGES: &[&str] = &[
    "systemd-sysv",
    // logind (needs D-Bus) turns the VMM's ACPI power button into a clean poweroff and
    // tracks SSH sessions, as on any Debian machine.
    "dbus",
    "libpam-systemd",
    "udev",
    "kmod",
    "openssh-server",
    "sudo",
    "iproute2",
    "ca-certificates",
    "curl",
    "e2fsprogs",
    // What a developer reaches for first on a new network, and what `cargo xtask bench
    // net` measures guest TCP with.
    "iputils-ping",
    "iperf3",
    // A first web server (`python3 -m http.server 80` is https://<name>.<zone> at once),
    // and what agents script with.
    "python3",
];
/// The base image spans the default 100 GB disk (24414062 blocks of 4 KiB, the VMM's
/// DEFAULT_DISK_SIZE) as a sparse file: no VM has to grow its file system at first boot,
/// and the inode tables of the empty groups are holes that read as zeros, so the guest
/// mounts with noinit_itable and never writes them either. Disks made larger than
/// this are grown by systemd-growfs.
const ROOTFS_BLOCKS: &str = "24414062";

/// Modules the guest initramfs loads, in this order (dependencies are added first).
const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
];
/// Modules the emulated KVM host's initramfs loads (its virtiofs root, KVM, and what
/// tests need; module autoloading cannot work there: /lib/modules is the outer host's).
const TESTHOST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtiofs",
    "virtio_net",
    "virtio_blk",
    "kvm_amd",
    "tun",
    "vhost_vsock",
    // Network namespaces joined by veth pairs, and the pre-TCX attachment of the VM
    // program (clsact qdisc + cls_bpf filter): the SSH API's end-to-end tests.
    "veth",
    "sch_ingress",
    "cls_bpf",
];

/// The initramfs' `/init`: shell on purpose, so that it is readable and tiny.
const INIT_SCRIPT: &str = include_str!("initramfs-init.sh");

pub struct Images {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub kernel_release: String,
}

/// Builds (or finds cached) every guest image.
pub fn build(boxd_binary: &Path) -> Result<Images> {
    std::fs::create_dir_all(images_dir())?;
    let kernel_dir = kernel()?;
    let kernel_release = std::fs::read_to_string(kernel_dir.join("release"))?
        .trim()
        .to_string();
    let modules = kernel_dir.join("lib/modules").join(&kernel_release);
    let initrd = initramfs(&modules)?;
    let tarball = debian_tarball()?;
    let rootfs = rootfs(&tarball, &modules, &kernel_release, boxd_binary)?;

    let dir = images_dir();
    symlink_force(&kernel_dir.join("vmlinuz"), &dir.join("vmlinuz"))?;
    symlink_force(&initrd, &dir.join("initrd.img"))?;
    symlink_force(&rootfs, &dir.join("rootfs.ext4"))?;
    let manifest = serde_json::json!({
        "kernel": kernel_dir.join("vmlinuz"),
        "initrd": initrd,
        "rootfs": rootfs,
        "kernel_release": kernel_release,
        "modules": modules,
    });
    write_atomic(
        &dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    Ok(Images {
        kernel: kernel_dir.join("vmlinuz"),
        initrd,
        rootfs,
        kernel_release,
    })
}

/// Downloads and unpacks Debian's cloud kernel; cached by the candidate package version.
fn kernel() -> Result<PathBuf> {
    let policy = output(Command::new("apt-cache").args(["policy", KERNEL_PACKAGE]))?;
    let version = policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| *v != "(none)")
        .with_context(|| {
            format!("apt knows no {KERNEL_PACKAGE}; run `apt-get update` (cargo xtask setup)")
        })?
        .to_string();
    let dir = images_dir().join(format!("kernel-{version}"));
    if dir.join("release").exists() {
        return Ok(dir);
    }
    let step = Step::start(format!("kernel: downloading {KERNEL_PACKAGE} {version}"));
    let work = images_dir().join(format!("kernel-{version}.partial"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // The metapackage names the real image package in its Depends.
    run_quiet(
        Command::new("apt-get")
            .args(["download", KERNEL_PACKAGE])
            .current_dir(&work),
    )?;
    let meta = find_deb(&work, KERNEL_PACKAGE)?;
    let depends = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&meta)
            .arg("Depends"),
    )?;
    let image_pkg = depends
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| format!("{KERNEL_PACKAGE} depends on no linux-image-*: {depends}"))?
        .to_string();
    run_quiet(
        Command::new("apt-get")
            .args(["download", &image_pkg])
            .current_dir(&work),
    )?;
    let deb = find_deb(&work, &image_pkg)?;
    let unpacked = work.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let release = image_pkg.trim_start_matches("linux-image-").to_string();
    let out = work.join("out");
    std::fs::create_dir_all(out.join("lib/modules"))?;
    std::fs::rename(
        unpacked.join(format!("boot/vmlinuz-{release}")),
        out.join("vmlinuz"),
    )
    .context("the kernel package holds no boot/vmlinuz-<release>")?;
    std::fs::rename(
        unpacked.join(format!("lib/modules/{release}")),
        out.join("lib/modules").join(&release),
    )?;
    std::fs::write(out.join("release"), format!("{release}\n"))?;
    std::fs::rename(&out, &dir)?;
    std::fs::remove_dir_all(&work)?;
    step.done();
    Ok(dir)
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!(
        "apt-get download left no {package}_*.deb in {}",
        dir.display()
    )
}

/// Every `.ko` under `modules` by module name (`-` and `_` are the same to the kernel).
fn module_index(modules: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name.strip_suffix(".ko")
            {
                index.insert(stem.replace('-', "_"), path);
            }
        }
    }
    Ok(index)
}

/// The `depends=` list from a module's `.modinfo` ELF section.
fn module_depends(ko: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(ko)?;
    let modinfo = elf_section(&bytes, ".modinfo")
        .with_context(|| format!("{} has no .modinfo section", ko.display()))?;
    Ok(modinfo
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect())
}

/// Finds a section by name in a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..4)? != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return None;
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let section = |i: usize| {
        let base = shoff + i * shentsize;
        Some((
            u32_at(base)? as usize,
            u64_at(base + 0x18)? as usize,
            u64_at(base + 0x20)? as usize,
        ))
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let names = elf.get(str_off..str_off + str_size)?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let name = names.get(name_off..)?.split(|b| *b == 0).next()?;
        if name == wanted.as_bytes() {
            return elf.get(off..off + size);
        }
    }
    None
}

/// Modules to load for `wanted`, dependencies first, each once.
fn load_order(index: &BTreeMap<String, PathBuf>, wanted: &[&str]) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        // Module dependency chains are short; a deep one means a cycle in bad metadata.
        if depth > 32 {
            bail!("module dependencies nest deeper than 32 at {name}");
        }
        if seen.contains(name) {
            return Ok(());
        }
        let path = index
            .get(name)
            .with_context(|| format!("kernel module {name} is not in the kernel package"))?;
        for dep in module_depends(path)? {
            visit(&dep, index, seen, order, depth + 1)?;
        }
        seen.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(name, index, &mut seen, &mut order, 0)?;
    }
    Ok(order)
}

/// Builds the initramfs: busybox, `/init`, and the modules for guests and the test host.
fn initramfs(modules: &Path) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    let busybox_bytes = std::fs::read(busybox)
        .context("no /bin/busybox; install busybox-static (cargo xtask setup)")?;
    if !is_static_elf(&busybox_bytes) {
        bail!("/bin/busybox is not statically linked; install busybox-static (cargo xtask setup)");
    }
    let index = module_index(modules)?;
    let guest = load_order(&index, GUEST_MODULES)?;
    let testhost = load_order(&index, TESTHOST_MODULES)?;
    let all: BTreeSet<&String> = guest.iter().chain(&testhost).collect();

    let mut key_parts: Vec<Vec<u8>> = vec![busybox_bytes.clone(), INIT_SCRIPT.as_bytes().to_vec()];
    key_parts.push(guest.join(",").into_bytes());
    key_parts.push(testhost.join(",").into_bytes());
    for name in &all {
        key_parts.push(std::fs::read(&index[*name])?);
    }
    let key = hash_parts(&key_parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let path = images_dir().join(format!("initrd-{key}.img"));
    if path.exists() {
        return Ok(path);
    }
    let step = Step::start(format!("initramfs: busybox + {} modules", all.len()));
    let mut w = cpio::Writer::new(Vec::new());
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "newroot",
        "modules",
        "lib",
        "lib/modules",
    ] {
        w.dir(dir, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, &busybox_bytes)?;
    for applet in [
        "printf",
        "dd",
        "sh",
        "mount",
        "insmod",
        "switch_root",
        "cat",
        "sleep",
        "usleep",
        "mkdir",
        "echo",
    ] {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    w.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    w.file("bin/boxd-boot-failed", 0o755, &boot_failed_elf())?;
    for name in &all {
        w.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &std::fs::read(&index[*name])?,
        )?;
    }
    w.file(
        "modules/guest.list",
        0o644,
        (guest.join("\n") + "\n").as_bytes(),
    )?;
    w.file(
        "modules/testhost.list",
        0o644,
        (testhost.join("\n") + "\n").as_bytes(),
    )?;
    let bytes = w.finish()?;
    write_atomic(&path, &bytes)?;
    step.done();
    Ok(path)
}

/// A complete static x86-64 program, a few instructions long, that tells boxd's VMM the
/// boot failed: `ioperm(0x510, 1, 1); outb(0xE1, 0x510); exit(0)`. Busybox cannot do
/// port I/O and Debian's kernel has no /dev/port, and a compiler is not needed for
/// 25 bytes of code.
fn boot_failed_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let code: &[u8] = &[
        0xb8, 0xad, 0x00, 0x00, 0x00, // mov eax, 173 (ioperm)
        0xbf, 0x10, 0x05, 0x00, 0x00, // mov edi, 0x510
        0xbe, 0x01, 0x00, 0x00, 0x00, // mov esi, 1
        0xba, 0x01, 0x00, 0x00, 0x00, // mov edx, 1
        0x0f, 0x05, // syscall
        0xb0, 0xe1, // mov al, 0xE1
        0x66, 0xba, 0x10, 0x05, // mov dx, 0x510
        0xee, // out dx, al
        0xb8, 0x3c, 0x00, 0x00, 0x00, // mov eax, 60 (exit)
        0x31, 0xff, // xor edi, edi
        0x0f, 0x05, // syscall
    ];
    let total = HEADERS + code.len() as u64;
    let mut e = Vec::with_capacity(total as usize);
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // program headers
    e.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&BASE.to_le_bytes());
    e.extend_from_slice(&BASE.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    assert_eq!(e.len() as u64, total);
    e
}

fn is_static_elf(bytes: &[u8]) -> bool {
    elf_section(bytes, ".interp").is_none()
}

/// The Debian root file system as mmdebstrap makes it; the slow step, so cached apart.
fn debian_tarball() -> Result<PathBuf> {
    let packages = ROOTFS_PACKAGES.join(",");
    let key = hash_parts(&[SUITE.as_bytes(), MIRROR.as_bytes(), packages.as_bytes()]);
    let path = images_dir().join(format!("debian-{key}.tar"));
    if path.exists() {
        return Ok(path);
    }
    if !is_root() {
        bail!(
            "building the Debian root file system needs root (mmdebstrap keeps file owners); run as root"
        );
    }
    let step = Step::start(format!(
        "rootfs: mmdebstrap {SUITE} with {packages} (about 90 s, once per package list)"
    ));
    let tmp = path.with_extension("tar.partial");
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet", "--format=tar"])
        .arg(format!("--include={packages}"))
        .arg(SUITE)
        .arg(&tmp)
        .arg(MIRROR))?;
    std::fs::rename(&tmp, &path)?;
    step.done();
    Ok(path)
}

/// Files boxd adds to the Debian tree: (path, mode, content).
fn overlay_files() -> Vec<(&'static str, u32, &'static str)> {
    vec![
        (
            "etc/systemd/system/boxd-agent.service",
            0o644,
            include_str!("guest/boxd-agent.service"),
        ),
        (
            "etc/systemd/system/boxd-ssh-hostkeys.service",
            0o644,
            include_str!("guest/boxd-ssh-hostkeys.service"),
        ),
        (
            "etc/systemd/network/10-boxd.network",
            0o644,
            include_str!("guest/10-boxd.network"),
        ),
        ("etc/fstab", 0o644, include_str!("guest/fstab")),
        ("etc/hostname", 0o644, "boxd\n"),
        (
            "etc/hosts",
            0o644,
            "127.0.0.1\tlocalhost\n127.0.1.1\tboxd\n::1\tlocalhost\n",
        ),
        ("etc/resolv.conf", 0o644, "nameserver 10.0.0.1\n"),
        (
            "etc/sudoers.d/boxd",
            0o440,
            "%sudo ALL=(ALL:ALL) NOPASSWD: ALL\n",
        ),
        (
            "etc/ssh/sshd_config.d/boxd.conf",
            0o644,
            include_str!("guest/sshd-boxd.conf"),
        ),
    ]
}

/// Packs the Debian tree plus boxd's agent and kernel modules into an ext4 base image.
fn rootfs(tarball: &Path, modules: &Path, kernel_release: &str, boxd: &Path) -> Result<PathBuf> {
    let mut parts: Vec<Vec<u8>> = vec![
        tarball
            .file_name()
            .unwrap_or_default()
            .as_encoded_bytes()
            .to_vec(),
        kernel_release.as_bytes().to_vec(),
        hash_file(boxd)?.into_bytes(),
        ROOTFS_BLOCKS.as_bytes().to_vec(),
    ];
    for (path, mode, content) in overlay_files() {
        parts.push(format!("{path}:{mode:o}:{content}").into_bytes());
    }
    let key = hash_parts(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let path = images_dir().join(format!("rootfs-{key}.ext4"));
    if path.exists() {
        return Ok(path);
    }
    let step = Step::start("rootfs: unpack, add the boxd agent and modules, pack as ext4");
    let tree = images_dir().join(format!("rootfs-{key}.tree"));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(&tree)?;
    let result = (|| -> Result<()> {
        run(Command::new("tar")
            .args([
                "--extract",
                "--numeric-owner",
                "--preserve-permissions",
                "-f",
            ])
            .arg(tarball)
            .arg("-C")
            .arg(&tree))?;
        let module_dst = tree.join("lib/modules").join(kernel_release);
        std::fs::create_dir_all(module_dst.parent().unwrap_or(&tree))?;
        run(Command::new("cp").arg("-a").arg(modules).arg(&module_dst))?;
        run(Command::new("chroot")
            .arg(&tree)
            .args(["/sbin/depmod", kernel_release]))?;
        std::fs::copy(boxd, tree.join("usr/local/bin/boxd"))?;
        for (rel, mode, content) in overlay_files() {
            let dst = tree.join(rel);
            std::fs::create_dir_all(dst.parent().unwrap_or(&tree))?;
            let _ = std::fs::remove_file(&dst);
            std::fs::write(&dst, content)?;
            std::fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        // Per-VM identity is made at first boot: machine-id by systemd, host keys by
        // boxd-ssh-hostkeys.service. A baked-in copy would be shared by every VM.
        std::fs::write(tree.join("etc/machine-id"), "")?;
        let _ = std::fs::remove_file(tree.join("var/lib/dbus/machine-id"));
        for entry in std::fs::read_dir(tree.join("etc/ssh"))? {
            let p = entry?.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("ssh_host_"))
            {
                std::fs::remove_file(p)?;
            }
        }
        run(Command::new("systemctl")
            .arg(format!("--root={}", tree.display()))
            .args([
                "enable",
                "--quiet",
                "boxd-agent.service",
                "boxd-ssh-hostkeys.service",
                "systemd-networkd.service",
            ]))?;
        let tmp = path.with_extension("ext4.partial");
        let _ = std::fs::remove_file(&tmp);
        // A 64 MiB journal instead of the 512 MiB mke2fs picks for 100 GB: every VM's
        // first write to it would otherwise cost that much disk in its own layer.
        run_quiet(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-J", "size=64", "-L", "boxd-root"])
                .args(["-E", "root_owner=0:0", "-d"])
                .arg(&tree)
                .arg(&tmp)
                .arg(ROOTFS_BLOCKS),
        )?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    })();
    std::fs::remove_dir_all(&tree)?;
    result?;
    step.done();
    Ok(path)
}

/// Removes cached images that the current inputs no longer produce.
pub fn prune(keep: &Images) -> Result<()> {
    let keep: BTreeSet<PathBuf> = [&keep.initrd, &keep.rootfs].into_iter().cloned().collect();
    for entry in std::fs::read_dir(images_dir())? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let stale =
            (name.starts_with("initrd-") || name.starts_with("rootfs-")) && !keep.contains(&path);
        if stale {
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_failure_program_is_a_well_formed_elf() {
        let e = boot_failed_elf();
        assert_eq!(&e[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(e[24..32].try_into().unwrap());
        assert_eq!(entry, 0x40_0000 + 120);
        // The code at the entry point starts with `mov eax, 173` (ioperm).
        assert_eq!(&e[120..125], &[0xb8, 0xad, 0, 0, 0]);
        // readelf (binutils, which comes with gcc) agrees it is an executable with one
        // loadable segment.
        let path = std::env::temp_dir().join(format!("boxd-boot-failed-{}", std::process::id()));
        std::fs::write(&path, &e).unwrap();
        let out = std::process::Command::new("readelf")
            .arg("-lh")
            .arg(&path)
            .output()
            .expect("readelf (binutils, installed with gcc)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("EXEC") && text.contains("LOAD"), "{text}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn finds_a_named_section_of_a_real_elf() {
        // Our own test binary is an ELF64 file with a .text section.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(elf_section(&exe, ".text").is_some());
        assert!(elf_section(&exe, ".no-such-section").is_none());
        assert!(elf_section(b"not an elf", ".text").is_none());
    }
}
