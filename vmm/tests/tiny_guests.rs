//! The VMM's mechanics, checked with tiny purpose-built guests on this host's /dev/kvm:
//! a few instructions of 64-bit code the tests assemble, entered in long mode with the
//! same GDT and page tables a Linux kernel gets. They run anywhere KVM works, including
//! hosts whose KVM emulates ring 0 (these guests execute a handful of instructions).

use boxd_vmm::control::{Client, Request};
use boxd_vmm::{ExitReason, MemoryRestore, VmConfig, Vmm, VsockConfig};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A little 64-bit assembler: just the instructions these guests use.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn out(mut self, port: u16, value: u8) -> Self {
        self.0.extend_from_slice(&[0xb0, value, 0x66, 0xba]); // mov al, v; mov dx, port
        self.0.extend_from_slice(&port.to_le_bytes());
        self.0.push(0xee); // out dx, al
        self
    }
    fn text(mut self, port: u16, s: &str) -> Self {
        for b in s.bytes() {
            self = self.out(port, b);
        }
        self
    }
    /// eax = [addr] (32-bit load through rbx).
    fn load32(mut self, addr: u32) -> Self {
        self.0.push(0xbb); // mov ebx, imm32
        self.0.extend_from_slice(&addr.to_le_bytes());
        self.0.extend_from_slice(&[0x8b, 0x03]); // mov eax, [rbx]
        self
    }
    /// Writes the 4 bytes of eax to the debug port, lowest first.
    fn eax_to_debug_port(mut self) -> Self {
        self.0.extend_from_slice(&[0x66, 0xba, 0x10, 0x05]); // mov dx, 0x510
        for _ in 0..4 {
            self.0.push(0xee); // out dx, al
            self.0.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
        }
        self
    }
    fn poweroff(self) -> Self {
        self.out(0x600, 0x34).halt()
    }
    fn halt(mut self) -> Self {
        self.0.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
        self
    }
    fn spin(mut self) -> Self {
        self.0.extend_from_slice(&[0xeb, 0xfe]); // jmp $
        self
    }
}

/// Why these tests cannot run here, when they cannot.
fn no_kvm() -> Option<&'static str> {
    std::fs::metadata("/dev/kvm")
        .is_err()
        .then_some("/dev/kvm is not available on this host")
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("boxd-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(config: VmConfig) -> (ExitReason, Vmm) {
    let mut vmm = Vmm::start(config).expect("VM starts");
    let reason = vmm
        .wait_timeout(Duration::from_secs(30))
        .expect("the guest finishes within 30 s");
    (reason, vmm)
}

#[test]
fn serial_output_reaches_the_console_file_and_power_off_ends_the_vm() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    let dir = TempDir::new("serial");
    let console = dir.0.join("console.log");
    let mut config = VmConfig::raw(
        Asm::default()
            .text(0x3f8, "hello from ring 0\n")
            .poweroff()
            .0,
    );
    config.console = Some(console.clone());
    let (reason, vmm) = run(config);
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(
        std::fs::read_to_string(&console).unwrap(),
        "hello from ring 0\n"
    );
    assert!(vmm.console_tail(100).ends_with("ring 0\n"));
}

#[test]
fn mmio_reads_reach_the_virtio_transport() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    let dir = TempDir::new("mmio");
    // With a vsock device configured, the first virtio-mmio window answers "virt".
    let code = Asm::default()
        .load32(0xd000_0000)
        .eax_to_debug_port()
        .load32(0xd000_0008) // device id
        .eax_to_debug_port()
        .poweroff();
    let mut config = VmConfig::raw(code.0);
    config.vsock = Some(VsockConfig {
        uds: dir.0.join("vsock.sock"),
        ready_port: None,
    });
    let (reason, vmm) = run(config);
    assert_eq!(reason, ExitReason::PowerOff);
    let status = vmm.status();
    let bytes: Vec<u64> = status["milestones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_u64().unwrap())
        .collect();
    assert_eq!(
        bytes,
        vec![
            b'v' as u64,
            b'i' as u64,
            b'r' as u64,
            b't' as u64,
            19,
            0,
            0,
            0
        ]
    );
}

#[test]
fn acpi_tables_sit_where_the_boot_params_say() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    // The RSDP signature "RSD PTR " at 0xe0000, read by the guest itself.
    let code = Asm::default()
        .load32(0xe0000)
        .eax_to_debug_port()
        .load32(0xe0004)
        .eax_to_debug_port()
        .poweroff();
    let (reason, vmm) = run(VmConfig::raw(code.0));
    assert_eq!(reason, ExitReason::PowerOff);
    let bytes: Vec<u8> = vmm.status()["milestones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["value"].as_u64().unwrap() as u8)
        .collect();
    assert_eq!(bytes, b"RSD PTR ");
}

#[test]
fn acpi_reset_and_triple_faults_ask_for_a_reboot() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    let (reason, _) = run(VmConfig::raw(Asm::default().out(0x600, 1).halt().0));
    assert_eq!(reason, ExitReason::Reboot);
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
    let (reason, _) = run(VmConfig::raw(vec![0x0f, 0x0b]));
    assert_eq!(reason, ExitReason::Reboot);
}

#[test]
fn control_socket_pauses_resumes_and_stops_a_running_guest() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    let dir = TempDir::new("control");
    let sock = dir.0.join("control.sock");
    // A guest that shows it runs: an endless loop of port writes, each one a VM exit
    // the VMM counts (`vcpu_exits`).
    let mut code = Asm::default().out(0x80, 0).0;
    code.extend_from_slice(&[0xeb, (-(code.len() as i8 + 2)) as u8]); // jmp back
    let mut config = VmConfig::raw(code);
    config.control = Some(sock.clone());
    let mut vmm = Vmm::start(config).unwrap();
    let driver = std::thread::spawn(move || {
        let mut c = Client::connect(&sock).unwrap();
        let mut status = move || c.call(&Request::Status {}).unwrap().status.unwrap();
        let exits = |s: &serde_json::Value| s["vcpu_exits"].as_u64().unwrap();
        let s = status();
        assert_eq!(s["state"], "running");
        let ran = |status: &mut dyn FnMut() -> serde_json::Value| {
            let before = exits(&status());
            std::thread::sleep(Duration::from_millis(300));
            exits(&status()) - before
        };
        assert!(ran(&mut status) > 0, "the guest does not run");
        let mut c = Client::connect(&sock).unwrap();
        assert!(c.call(&Request::Pause {}).unwrap().ok);
        let s = status();
        assert_eq!(s["state"], "paused");
        assert_eq!(ran(&mut status), 0, "a paused guest ran");
        assert!(c.call(&Request::Resume {}).unwrap().ok);
        assert_eq!(status()["state"], "running");
        assert!(ran(&mut status) > 0, "the resumed guest does not run");
        // A bad request gets an error that says what is expected, and changes nothing.
        let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        std::io::Write::write_all(&mut raw, b"{\"op\":\"explode\"}\n").unwrap();
        let mut reply = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(raw), &mut reply).unwrap();
        assert!(
            reply.contains("\"ok\":false") && reply.contains("op"),
            "{reply}"
        );
        assert_eq!(status()["state"], "running");
        assert!(
            ran(&mut status) > 0,
            "the guest stopped after a bad request"
        );
        assert!(c.call(&Request::Stop {}).unwrap().ok);
    });
    let started = Instant::now();
    let reason = vmm.wait_timeout(Duration::from_secs(30));
    driver.join().unwrap();
    assert_eq!(reason, Some(ExitReason::Stopped));
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(vmm);
    assert!(
        !dir.0.join("control.sock").exists(),
        "the control socket is removed"
    );
}

#[test]
fn bad_configurations_are_refused_with_the_reason() {
    let mut c = VmConfig::raw(vec![0xf4]);
    c.vcpus = 0;
    let e = Vmm::start(c).err().unwrap().to_string();
    assert!(e.contains("vCPUs") && e.contains("1 to"), "{e}");

    let mut c = VmConfig::raw(vec![0xf4]);
    c.memory_mib = 1;
    let e = Vmm::start(c).err().unwrap().to_string();
    assert!(e.contains("16 MiB"), "{e}");

    let mut c = VmConfig::raw(vec![]);
    c.boot = boxd_vmm::BootSource::Linux {
        kernel: "/nonexistent/vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    };
    let e = Vmm::start(c).err().unwrap().to_string();
    assert!(
        e.contains("/nonexistent/vmlinuz") && e.contains("cargo xtask images"),
        "{e}"
    );

    // A file that is not a kernel is named as such.
    let dir = TempDir::new("corrupt-kernel");
    let junk = dir.0.join("vmlinuz");
    std::fs::write(&junk, vec![0x5a; 64 << 10]).unwrap();
    let mut c = VmConfig::raw(vec![]);
    c.boot = boxd_vmm::BootSource::Linux {
        kernel: junk.clone(),
        initrd: None,
        cmdline: String::new(),
    };
    let e = Vmm::start(c).err().unwrap().to_string();
    assert!(
        e.contains(&junk.display().to_string()) && e.contains("bzImage"),
        "{e}"
    );
}

#[test]
fn a_failed_boot_reported_by_the_initramfs_is_a_crash_that_says_why() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    // What boxd's initramfs does when it cannot mount the root: a line on the
    // console, 0xE1 on the debug port, poweroff.
    let code = Asm::default()
        .text(0x3f8, "boxd-init: cannot mount /dev/vda\n")
        .out(0x510, 0xe1)
        .poweroff();
    let (reason, _) = run(VmConfig::raw(code.0));
    assert_eq!(
        reason,
        ExitReason::Crashed(
            "the guest could not boot its root file system: cannot mount /dev/vda".into()
        )
    );
}

#[test]
fn a_second_vmm_cannot_open_the_same_disk_and_leaves_nothing_behind() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    let dir = TempDir::new("disk-lock");
    let disk = boxd_vmm::DiskSpec {
        base: None,
        frozen: vec![],
        top: dir.0.join("disk.img"),
        size: Some(64 << 20),
        read_only: false,
    };
    let mut first = VmConfig::raw(Asm::default().spin().0);
    first.disk = Some(disk.clone());
    let mut running = Vmm::start(first).unwrap();
    let mut second = VmConfig::raw(Asm::default().spin().0);
    second.disk = Some(disk);
    second.control = Some(dir.0.join("second.sock"));
    let e = Vmm::start(second).err().unwrap().to_string();
    assert!(e.contains("in use by another VMM"), "{e}");
    assert!(!dir.0.join("second.sock").exists());
    drop(running.wait_timeout(Duration::from_millis(1)));
}

#[test]
fn the_kvm_probe_measures_ring_zero_speed() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    let speed = boxd_vmm::probe::kvm_speed().unwrap();
    assert!(speed.ns_per_instruction.is_finite() && speed.ns_per_instruction > 0.0);
    eprintln!(
        "ring 0 runs at {:.1} ns/instruction here ({})",
        speed.ns_per_instruction,
        if speed.hardware_speed {
            "hardware speed"
        } else {
            "emulated"
        }
    );
}

// ---- Snapshots -------------------------------------------------------------------

/// One of the guests in tests/guests/, assembled.
fn assemble(name: &str, dir: &std::path::Path) -> Vec<u8> {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/guests/{name}.s"));
    boxd_testkit::assemble(&src, dir).unwrap()
}

/// What the counter guest (tests/guests/counter.s) keeps in memory.
#[derive(Debug, Clone, Copy)]
struct Counters {
    rounds: u64,
    ticks: u64,
    tsc_backwards: u64,
    register: u64,
}

/// Reads the counter guest's numbers out of a snapshot's memory file (guest RAM below
/// 3 GiB sits at the same offsets in the file).
fn counters(snapshot: &std::path::Path) -> Counters {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(snapshot.join("memory")).unwrap();
    let q = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 0x200000 + off).unwrap();
        u64::from_le_bytes(b)
    };
    Counters {
        rounds: q(0),
        ticks: q(8),
        tsc_backwards: q(0x18),
        register: q(0x20),
    }
}

/// Serves `vmm` until the driver, after `wait`, snapshots it into `dir` and stops it.
fn snapshot_after(
    mut vmm: Vmm,
    sock: &std::path::Path,
    dir: &std::path::Path,
    wait: Duration,
) -> (serde_json::Value, serde_json::Value) {
    let (sock, dir) = (sock.to_path_buf(), dir.to_path_buf());
    let driver = std::thread::spawn(move || {
        std::thread::sleep(wait);
        let mut c = Client::connect(&sock).unwrap();
        let status = c.call(&Request::Status {}).unwrap().status.unwrap();
        let reply = c
            .call(&Request::Snapshot {
                dir,
                then: boxd_vmm::AfterSnapshot::Stop,
            })
            .unwrap();
        assert!(reply.ok, "snapshot refused: {:?}", reply.error);
        (status, reply.snapshot.unwrap())
    });
    let reason = vmm.wait_timeout(Duration::from_secs(30));
    let out = driver.join().unwrap();
    assert_eq!(
        reason,
        Some(ExitReason::Stopped),
        "a snapshot with then=stop ends the VMM"
    );
    out
}

#[test]
fn a_restored_guest_goes_on_with_its_registers_memory_timer_and_clock() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    let dir = TempDir::new("snap-counter");
    let sock = dir.0.join("control.sock");
    let mut config = VmConfig::raw(assemble("counter", &dir.0));
    config.control = Some(sock.clone());
    config.memory_mib = 64;
    let first = dir.0.join("first");
    let (_, report) = snapshot_after(
        Vmm::start(config).unwrap(),
        &sock,
        &first,
        Duration::from_millis(500),
    );
    let before = counters(&first);
    assert!(
        before.rounds > 100 && before.ticks > 2,
        "the guest ran before the save: {before:?}"
    );
    // The save may land between the mirror's store and the memory counter's increment.
    assert!(before.register - before.rounds <= 1, "{before:?}");
    assert_eq!(before.tsc_backwards, 0);
    // Only pages with data are written, into a sparse file of the guest's size.
    let memory = std::fs::metadata(first.join("memory")).unwrap();
    assert_eq!(memory.len(), 64 << 20);
    let written = report["memory_bytes"].as_u64().unwrap();
    assert!(
        written > 0 && written < 2 << 20,
        "wrote {written} bytes of a mostly empty guest"
    );
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&memory) * 512 < 4 << 20,
        "the memory file is not sparse"
    );

    // A new VMM continues the snapshot; after a while it is saved again.
    let restored = Vmm::restore(&first, None, true, MemoryRestore::Lazy).unwrap();
    assert!(
        !first.exists() && !dir.0.join("first.consumed").exists(),
        "a consumed snapshot is gone once the guest runs on"
    );
    let second = dir.0.join("second");
    let (status, _) = snapshot_after(restored, &sock, &second, Duration::from_millis(500));
    assert_eq!(
        status["restored_from"]["snapshot"],
        first.display().to_string()
    );
    assert_eq!(
        status["restored_from"]["memory"]["mode"], "lazy",
        "{status}"
    );
    let after = counters(&second);
    assert!(
        after.rounds > before.rounds + 100,
        "the loop goes on: {before:?} -> {after:?}"
    );
    assert!(
        after.register - after.rounds <= 1,
        "the register-held counter continued from its saved value: {after:?}"
    );
    assert!(
        after.ticks > before.ticks + 2,
        "the LAPIC timer fires after the restore: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.tsc_backwards, 0,
        "the guest's TSC never went backwards"
    );
    // Memory the guest wrote once, before the first save, is all there.
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(second.join("memory")).unwrap();
    for page in 0..64u64 {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 0x300000 + page * 4096).unwrap();
        assert_eq!(u64::from_le_bytes(b), page ^ 0x5a5a_5a5a, "page {page}");
    }
}

/// Set in the child process that restores a damaged snapshot lazily (the directory).
const LAZY_CHILD: &str = "BOXD_TEST_LAZY_DAMAGED";

/// The child's part: restore the damaged snapshot lazily; the VM must stop with the
/// reason (or the process end itself with exit 70 first).
fn lazy_child(dir: &std::path::Path) {
    match Vmm::restore(dir, None, false, MemoryRestore::Lazy) {
        Err(e) => {
            assert!(e.to_string().contains("checksum"), "{e}");
            eprintln!("lazy child: crashed: refused at restore: {e}");
        }
        Ok(mut vm) => match vm.wait_timeout(Duration::from_secs(20)) {
            Some(ExitReason::Crashed(why)) => {
                assert!(why.contains("checksum") && why.contains("memory"), "{why}");
                eprintln!("lazy child: crashed: {why}");
            }
            other => {
                eprintln!("lazy child: guest saw the damaged block and went on: {other:?}");
                panic!("a damaged block must stop the VM: {other:?}");
            }
        },
    }
}

#[test]
fn a_snapshot_that_does_not_check_out_is_refused_and_left_as_it_is() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    if let Some(dir) = std::env::var_os(LAZY_CHILD) {
        lazy_child(std::path::Path::new(&dir));
        return;
    }
    let dir = TempDir::new("snap-refused");
    let sock = dir.0.join("control.sock");
    let mut config = VmConfig::raw(assemble("counter", &dir.0));
    config.control = Some(sock.clone());
    let good = dir.0.join("good");
    snapshot_after(
        Vmm::start(config.clone()).unwrap(),
        &sock,
        &good,
        Duration::from_millis(200),
    );

    let copy = |name: &str| {
        let to = dir.0.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["state", "memory"] {
            std::fs::copy(good.join(f), to.join(f)).unwrap();
        }
        to
    };
    let contents =
        |d: &std::path::Path| ["state", "memory"].map(|f| std::fs::read(d.join(f)).unwrap());
    let refused = |d: &std::path::Path, config: Option<VmConfig>, expect: &[&str]| {
        let before = contents(d);
        let e = Vmm::restore(d, config, true, MemoryRestore::Eager)
            .err()
            .expect("refused")
            .to_string();
        for want in expect {
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
        assert_eq!(contents(d), before, "a refused restore changes nothing");
        assert!(!sock.exists(), "a refused restore leaves no control socket");
    };

    // Another format version.
    let v = copy("version");
    let mut state = std::fs::read(v.join("state")).unwrap();
    state[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(v.join("state"), &state).unwrap();
    refused(&v, None, &["version 99", "state"]);
    // A truncated state file.
    let t = copy("truncated");
    let state = std::fs::read(t.join("state")).unwrap();
    std::fs::write(t.join("state"), &state[..state.len() / 2]).unwrap();
    refused(&t, None, &["truncated", "state"]);
    // One flipped byte in the state and one in the memory.
    let c = copy("corrupt-state");
    let mut state = std::fs::read(c.join("state")).unwrap();
    let n = state.len();
    state[n - 10] ^= 0x20;
    std::fs::write(c.join("state"), &state).unwrap();
    refused(&c, None, &["checksum", "state"]);
    let m = copy("corrupt-memory");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("memory"))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0x200000).unwrap();
        f.write_all_at(&[b[0] ^ 1], 0x200000).unwrap();
    }
    refused(&m, None, &["checksum", "memory"]);
    // A truncated memory file.
    let tm = copy("truncated-memory");
    std::fs::OpenOptions::new()
        .write(true)
        .open(tm.join("memory"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    refused(&tm, None, &["truncated", "memory"]);
    // The same snapshot onto a machine of another size.
    let mut bigger = config.clone();
    bigger.memory_mib = 64;
    refused(&good, Some(bigger), &["MiB", "good"]);
    let mut wider = config.clone();
    wider.vcpus = 2;
    refused(&good, Some(wider), &["vCPUs"]);
    // No snapshot at all, and one a crash left half-written.
    let e = Vmm::restore(&dir.0.join("nothing"), None, true, MemoryRestore::Lazy)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no such snapshot"), "{e}");
    // A lazy restore checks each block as it loads it: the guest never sees the bad
    // byte, and the VM stops with the reason. A vCPU may be left waiting in the kernel
    // on the page that never comes, in which case the VMM process ends itself (exit 70,
    // the reason on stderr), as a `boxd vmm` process would: so this part runs in a
    // child process, this same test re-run with the snapshot to restore.
    let ml = copy("corrupt-memory-lazy");
    std::fs::copy(m.join("memory"), ml.join("memory")).unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_snapshot_that_does_not_check_out_is_refused_and_left_as_it_is",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(LAZY_CHILD, &ml)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&child.stderr);
    let out = String::from_utf8_lossy(&child.stdout);
    match child.status.code() {
        Some(0) => assert!(
            out.contains("1 passed") && err.contains("lazy child: crashed:"),
            "the child restored and reported: {out}\n{err}"
        ),
        Some(70) => assert!(
            err.contains("restoring memory failed") && err.contains("checksum"),
            "the VMM ended itself, saying why: {err}"
        ),
        other => panic!("the lazy restore of a damaged block ended with {other:?}: {out}\n{err}"),
    }
    assert!(
        !err.contains("lazy child: guest saw"),
        "the guest never runs on the damaged block: {err}"
    );
    std::fs::rename(&good, boxd_vmm::snapshot::partial_dir(&good)).unwrap();
    let e = Vmm::restore(&good, None, true, MemoryRestore::Lazy)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("never finished"), "{e}");
}

#[test]
fn a_snapshot_into_an_existing_directory_is_refused_and_the_guest_runs_on() {
    if let Some(why) = no_kvm() {
        boxd_testkit::skip!("{why}");
    }
    let dir = TempDir::new("snap-exists");
    let sock = dir.0.join("control.sock");
    let mut config = VmConfig::raw(assemble("counter", &dir.0));
    config.control = Some(sock.clone());
    let taken = dir.0.join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("keep"), b"mine").unwrap();
    let mut vmm = Vmm::start(config).unwrap();
    let driver = std::thread::spawn(move || {
        let mut c = Client::connect(&sock).unwrap();
        let reply = c
            .call(&Request::Snapshot {
                dir: taken.clone(),
                then: boxd_vmm::AfterSnapshot::Stop,
            })
            .unwrap();
        assert!(!reply.ok);
        assert!(reply.error.unwrap().contains("already exists"));
        assert_eq!(std::fs::read(taken.join("keep")).unwrap(), b"mine");
        let exits = |c: &mut Client| {
            c.call(&Request::Status {}).unwrap().status.unwrap()["vcpu_exits"]
                .as_u64()
                .unwrap()
        };
        let a = exits(&mut c);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            exits(&mut c) > a,
            "the guest runs on after a refused snapshot"
        );
        // A snapshot that resumes leaves the guest running, too.
        let reply = c
            .call(&Request::Snapshot {
                dir: taken.with_file_name("resumed"),
                then: boxd_vmm::AfterSnapshot::Resume,
            })
            .unwrap();
        assert!(reply.ok, "{:?}", reply.error);
        let a = exits(&mut c);
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            exits(&mut c) > a,
            "the guest runs on after a snapshot with then=resume"
        );
        assert!(c.call(&Request::Stop {}).unwrap().ok);
    });
    let reason = vmm.wait_timeout(Duration::from_secs(30));
    driver.join().unwrap();
    assert_eq!(reason, Some(ExitReason::Stopped));
}
