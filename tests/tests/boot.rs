//! A stock Debian kernel boots under `boxd vmm` with the project's initramfs, a
//! copy-on-write disk over the Debian base image, and the agent answering over vsock;
//! what is written survives a restart. Runs inside the emulated KVM host where this
//! host lacks hardware virtualization.

use anyhow::Result;
use boxd_agent::proto::{Kind, Pty, Request};
use boxd_tests::guest::{Machine, Place, Spec, place};
use boxd_tests::testhost::Images;
use std::time::Duration;

const BOOT_LIMIT: Duration = Duration::from_secs(300);

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("boxd-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn debian_boots_answers_and_keeps_its_disk_across_a_restart() -> Result<()> {
    if let Place::RanInTestHost = place()? {
        return Ok(());
    }
    let images = Images::load()?;
    let dir = scratch("boot");
    let spec = Spec::default();

    let mut vm = Machine::start("e2e", &dir, &spec)?;
    let ready = vm.wait_ready(BOOT_LIMIT)?;
    let status = vm.status()?;
    let agent_ms = status["agent"]["after_ms"].as_f64().unwrap_or(f64::NAN);
    println!(
        "BOOT vmm-start-to-agent-ready {:.0} ms (agent's own report: {agent_ms:.0} ms after vCPU start)",
        ready.as_secs_f64() * 1000.0
    );
    assert_eq!(status["state"], "running");
    assert_eq!(status["devices"], serde_json::json!(["block", "vsock"]));

    // The VMM runs in its own cgroup, limited to its vCPUs and its memory.
    let pid = vm.pid().expect("running");
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_string();
    assert!(rel.ends_with("/boxd/e2e"), "VMM cgroup: {own}");
    let cgroup = std::path::Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(cgroup.join("cpu.max"))?.trim(),
        "200000 100000"
    );
    let memory_max: u64 = std::fs::read_to_string(cgroup.join("memory.max"))?
        .trim()
        .parse()?;
    assert!(
        memory_max > 1 << 30 && memory_max < 2 << 30,
        "memory.max {memory_max}"
    );

    // The kernel is Debian's cloud kernel, as the images recorded it.
    let agent = vm.agent();
    let uname = agent.exec(&["uname", "-r"], None, 4096)?;
    assert_eq!(uname.status.code, 0);
    assert_eq!(
        String::from_utf8_lossy(&uname.stdout).trim(),
        images.kernel_release
    );
    assert!(
        images.kernel_release.ends_with("cloud-amd64"),
        "{}",
        images.kernel_release
    );

    // Exit codes, stderr and stdin pass through.
    let out = agent.exec(
        &["sh", "-c", "cat; echo oops >&2; exit 7"],
        Some(b"from stdin\n"),
        4096,
    )?;
    assert_eq!(out.status.code, 7);
    assert_eq!(out.stdout, b"from stdin\n");
    assert_eq!(out.stderr, b"oops\n");
    let missing = agent
        .exec(&["/no/such/command"], None, 4096)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("/no/such/command"), "{missing}");

    // A terminal when asked for one.
    let req = Request::Exec {
        argv: vec!["sh".into(), "-c".into(), "tty; stty size".into()],
        env: vec![],
        cwd: None,
        user: None,
        pty: Some(Pty {
            rows: 33,
            cols: 101,
            term: "xterm".into(),
        }),
        kill_on_disconnect: true,
    };
    let mut tty = Vec::new();
    let st = agent.exec_stream(&req, None, &mut |k, d| {
        assert_eq!(k, Kind::Stdout);
        tty.extend_from_slice(d);
    })?;
    let tty = String::from_utf8_lossy(&tty);
    assert_eq!(st.code, 0, "{tty}");
    assert!(tty.contains("/dev/pts/") && tty.contains("33 101"), "{tty}");

    // The root file system spans the 100 GB virtual disk.
    let df = agent.exec(&["df", "--output=size", "-B1", "/"], None, 4096)?;
    let size: u64 = String::from_utf8_lossy(&df.stdout)
        .lines()
        .nth(1)
        .unwrap_or("0")
        .trim()
        .parse()?;
    assert!(
        size > 90_000_000_000,
        "root file system is only {size} bytes"
    );

    // Identity: host name and SSH keys.
    agent.set_hostname("e2e-box")?;
    let key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0ZXN0a2V5dGVzdGtleXRlc3RrZXl0ZXN0a2V5 e2e@test"
            .to_string();
    agent.install_keys("root", std::slice::from_ref(&key))?;
    assert!(agent.set_hostname("bad_name!").is_err());
    let ak = agent.read_file("/root/.ssh/authorized_keys", 1 << 20)?;
    assert_eq!(String::from_utf8_lossy(&ak).trim(), key);
    let host = agent.exec(&["hostname"], None, 256)?;
    assert_eq!(String::from_utf8_lossy(&host.stdout).trim(), "e2e-box");

    // A file written through the agent...
    let content: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
    assert_eq!(
        agent.write_file("/root/e2e/data.bin", &content, 0o600)?,
        content.len() as u64
    );
    let back = agent.read_file("/root/e2e/data.bin", 16 << 20)?;
    assert_eq!(back, content);

    // ...survives a clean power-off (ACPI power button) and a fresh VMM on the same disk.
    let reply = vm.control()?.call(&boxd_vmm::control::Request::Shutdown {
        timeout_ms: 120_000,
    })?;
    assert!(reply.ok, "{reply:?}");
    let code = vm.wait_exit(Duration::from_secs(150))?;
    assert_eq!(code, 0, "{}", vm.log());
    assert!(
        vm.log().contains("powered off"),
        "the guest should power itself off:\n{}\nconsole:\n{}",
        vm.log(),
        vm.console_tail(6000)
    );
    assert!(
        !dir.join("control.sock").exists() && !dir.join("vsock.sock").exists(),
        "sockets are cleaned up"
    );
    assert!(!cgroup.exists(), "the VM's cgroup is removed when it ends");
    drop(vm);

    let mut vm = Machine::start("e2e", &dir, &spec)?;
    let ready = vm.wait_ready(BOOT_LIMIT)?;
    println!(
        "BOOT restart-to-agent-ready {:.0} ms",
        ready.as_secs_f64() * 1000.0
    );
    let agent = vm.agent();
    assert_eq!(agent.read_file("/root/e2e/data.bin", 16 << 20)?, content);
    let host = agent.exec(&["cat", "/etc/hostname"], None, 256)?;
    assert_eq!(String::from_utf8_lossy(&host.stdout).trim(), "e2e-box");

    // What this VM wrote lives in its own sparse layer, a few MB, not 100 GB.
    use std::os::unix::fs::MetadataExt;
    let layer = std::fs::metadata(dir.join("disk.img"))?;
    let used = layer.blocks() * 512;
    assert_eq!(
        layer.len(),
        99_999_997_952,
        "the layer spans the virtual disk"
    );
    assert!(
        used > content.len() as u64 && used < 256 << 20,
        "layer holds {used} bytes"
    );
    println!(
        "disk layer after two boots: {:.1} MB allocated",
        used as f64 / 1e6
    );
    let reply = vm.control()?.call(&boxd_vmm::control::Request::Stop {})?;
    assert!(reply.ok);
    assert_eq!(vm.wait_exit(Duration::from_secs(30))?, 0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn a_corrupt_root_image_fails_the_boot_with_a_reason() -> Result<()> {
    if let Place::RanInTestHost = place()? {
        return Ok(());
    }
    let dir = scratch("corrupt");
    std::fs::create_dir_all(&dir)?;
    let junk = dir.join("junk.img");
    std::fs::write(&junk, vec![0xa5u8; 16 << 20])?;
    // Instead of the Debian base image: 16 MB of junk.
    let spec = Spec {
        extra_args: vec!["--disk-base".into(), junk.display().to_string()],
        ..Spec::default()
    };
    let mut vm = Machine::start("corrupt", &dir.join("vm"), &spec)?;
    let code = vm.wait_exit(Duration::from_secs(240))?;
    let log = vm.log();
    assert_ne!(code, 0, "{log}");
    assert!(
        log.contains("could not boot its root file system")
            && log.contains("cannot mount /dev/vda"),
        "{log}"
    );
    assert!(!dir.join("vm/control.sock").exists() && !dir.join("vm/vsock.sock").exists());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
