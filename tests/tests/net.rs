//! A VM's virtio-net device, served by boxd's vhost-user backend daemon with a TAP on
//! the host side: the guest gets its link with two queue pairs (the VMM serves the
//! control queue), bulk TCP flows both ways intact (offloads and mergeable buffers in
//! play), the host reaches the guest's sshd, and a restarted VMM reconnects to the same
//! port. Runs inside the emulated KVM host where this host
//! lacks hardware virtualization.

use anyhow::{Context, Result};
use boxd_tests::guest::{Machine, Place, Spec, boxd_binary, place};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TAP: &str = "bxtest0";
const PAYLOAD_BYTES: usize = 8 << 20;

struct Backend(Child);
impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn payload() -> Vec<u8> {
    (0..PAYLOAD_BYTES)
        .map(|i| (i * 7 + i / 4099) as u8)
        .collect()
}

/// Serves `body` over HTTP/1.0 to one client on 10.0.0.1:8080.
fn serve_download(body: Vec<u8>) -> Result<std::thread::JoinHandle<()>> {
    let l = TcpListener::bind("10.0.0.1:8080")?;
    Ok(std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    }))
}

fn guest_sh(vm: &Machine, script: &str) -> Result<String> {
    let out = vm.agent().exec(&["bash", "-c", script], None, 1 << 20)?;
    anyhow::ensure!(
        out.status.code == 0,
        "`{script}` exited {}: {}",
        out.status.code,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn the_guest_network_runs_through_the_vhost_user_backend() -> Result<()> {
    if let Place::RanInTestHost = place()? {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("boxd-e2e-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("net.sock");
    let control = dir.join("netd.sock");

    // The daemon, and the VM's port on it with two queue pairs (one per vCPU).
    let _backend = Backend(
        Command::new(boxd_binary()?)
            .args(["net", "serve", "--control"])
            .arg(&control)
            .env("BOXD_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.join("net.log"))?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !control.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the net daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let add = Command::new(boxd_binary()?)
        .args([
            "net",
            "add",
            "--name",
            "net",
            "--queue-pairs",
            "2",
            "--tap",
            TAP,
        ])
        .arg("--socket")
        .arg(&socket)
        .arg("--control")
        .arg(&control)
        .output()?;
    anyhow::ensure!(
        add.status.success(),
        "boxd net add: {}",
        String::from_utf8_lossy(&add.stderr)
    );
    let ip = Command::new("ip")
        .args(["addr", "add", "10.0.0.1/30", "dev", TAP])
        .status()?;
    anyhow::ensure!(ip.success(), "could not address the TAP {TAP}");
    let stats = || -> Result<serde_json::Value> {
        let out = Command::new(boxd_binary()?)
            .args(["net", "stats", "net", "--json", "--control"])
            .arg(&control)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice::<serde_json::Value>(&out.stdout)?[0].clone())
    };

    let spec = Spec {
        extra_args: vec!["--net".into(), socket.display().to_string()],
        ..Spec::default()
    };
    let vm_dir = dir.join("vm");
    let mut vm = Machine::start("net", &vm_dir, &spec)?;
    vm.wait_ready(Duration::from_secs(300))?;
    assert_eq!(
        vm.status()?["devices"],
        serde_json::json!(["block", "vsock", "net"])
    );

    // The guest's link comes up with the address every boxd VM has.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let addrs = guest_sh(&vm, "ip -4 -o addr show")?;
        if addrs.contains("10.0.0.2/30") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the guest never got 10.0.0.2/30:\n{addrs}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Both queue pairs are in use: the guest asked for two over the control queue
    // the VMM serves, and the kernel made a queue of each kind per pair.
    let queues = guest_sh(&vm, "ls /sys/class/net/eth0/queues | sort | tr '\\n' ' '")?;
    assert_eq!(
        queues, "rx-0 rx-1 tx-0 tx-1",
        "the guest did not get two queue pairs"
    );

    // Host to guest, bulk: 8 MB over HTTP, checked by hash in the guest.
    let body = payload();
    let want = hex::encode(Sha256::digest(&body));
    let server = serve_download(body)?;
    let got = guest_sh(
        &vm,
        "curl -sf --max-time 120 http://10.0.0.1:8080/ | sha256sum | cut -d' ' -f1",
    )?;
    server.join().ok();
    assert_eq!(got, want, "download through the backend corrupted the data");

    // Guest to host, bulk: 8 MB of random bytes, hashed on both ends.
    let up = TcpListener::bind("10.0.0.1:8081")?;
    let receiver = std::thread::spawn(move || -> Result<String> {
        let (mut s, _) = up.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut data = Vec::new();
        s.read_to_end(&mut data)?;
        Ok(format!(
            "{} {}",
            data.len(),
            hex::encode(Sha256::digest(&data))
        ))
    });
    let sent = guest_sh(
        &vm,
        "head -c 8388608 /dev/urandom > /tmp/up && cat /tmp/up > /dev/tcp/10.0.0.1/8081 && echo \"$(stat -c %s /tmp/up) $(sha256sum < /tmp/up | cut -d' ' -f1)\"",
    )?;
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    assert_eq!(
        received, sent,
        "upload through the backend corrupted the data"
    );

    // The host reaches the guest's own sshd on its link address.
    let deadline = Instant::now() + Duration::from_secs(120);
    let banner = loop {
        match TcpStream::connect_timeout(&"10.0.0.2:22".parse()?, Duration::from_secs(5)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut b = [0u8; 64];
                let n = s.read(&mut b)?;
                break String::from_utf8_lossy(&b[..n]).into_owned();
            }
            Err(e) => anyhow::ensure!(Instant::now() < deadline, "sshd unreachable: {e}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner}");

    // A new VMM for the same machine reconnects to the same backend and TAP.
    let r = vm.control()?.call(&boxd_vmm::control::Request::Stop {})?;
    assert!(r.ok);
    vm.wait_exit(Duration::from_secs(30))?;
    drop(vm);
    let mut vm = Machine::start("net", &vm_dir, &spec)?;
    vm.wait_ready(Duration::from_secs(300))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let server = serve_download(b"hello again".to_vec())?;
    let again = loop {
        let r = guest_sh(&vm, "curl -sf --max-time 5 http://10.0.0.1:8080/ || true")?;
        if !r.is_empty() || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    server.join().ok();
    assert_eq!(again, "hello again");
    let log = std::fs::read_to_string(dir.join("net.log")).context("backend log")?;
    assert!(log.matches("frontend disconnected").count() >= 1, "{log}");
    let s = stats()?;
    assert_eq!(s["connections"], 2, "{s}");
    assert!(
        s["rx_bytes"].as_u64() > Some(8 << 20) && s["tx_bytes"].as_u64() > Some(8 << 20),
        "{s}"
    );
    for reason in [
        "tx_drop_spoofed_mac",
        "tx_drop_spoofed_ip",
        "tx_drop_spoofed_arp",
        "tx_drop_malformed",
    ] {
        assert_eq!(
            s[reason], 0,
            "a well-behaved guest's frames were dropped: {s}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
