//! The eBPF data path on real interfaces: hosts made of network namespaces and veth
//! pairs, the programs attached by the real `boxd bpf up`, programmed by
//! `boxd bpf apply`, driven by the kernel's own TCP/UDP/ICMP and the vhost-user
//! backend. Needs root.
//!
//! Topology of a single node:
//!
//! ```text
//!  client ns               host ns (boxd)                      vm ns
//!  c0 198.51.100.2 ---- up0 198.51.100.1 [XDP router]
//!                         tap0 10.0.0.1 [TC VM program] ----- eth0 10.0.0.2 (public 203.0.113.7)
//! ```
//!
//! The client reaches public addresses on-link (it ARPs for them; the router answers).
//! The veths of the client and the VM stand-in compute full checksums (tx offload off),
//! as packets from a wire have them.

use anyhow::{Context, Result, bail, ensure};
use boxd_tests::bpf::{Datapath, full_checksums, in_ns, mac, run_ok, tools_missing, veth};
use boxd_tests::net::{NetDaemon, Netns};
use boxd_tests::pkt::VNET_HDR_LEN;
use boxd_vhost_net::frontend::{Frontend, Options};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

/// What these tests need, when something of it is missing.
fn missing() -> Option<String> {
    if !boxd_tests::is_root() {
        return Some("network namespaces and BPF need root".into());
    }
    tools_missing()
}

/// A single node: client, host running the data path, one VM stand-in.
struct Single {
    client: Netns,
    host: Netns,
    vm: Netns,
    dp: Datapath,
    tag: String,
}

impl Single {
    fn new(tag: &str) -> Result<Self> {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let client = Netns::new(&format!("bxc{id}"))?;
        let host = Netns::new(&format!("bxh{id}"))?;
        let vm = Netns::new(&format!("bxv{id}"))?;
        veth(&client.name, "c0", &host.name, "up0")?;
        veth(&host.name, "tap0", &vm.name, "eth0")?;
        client.ip(&["addr", "add", "198.51.100.2/24", "dev", "c0"])?;
        client.ip(&["route", "add", "203.0.113.0/24", "dev", "c0"])?;
        host.ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"])?;
        host.ip(&["addr", "add", "10.0.0.1/30", "dev", "tap0"])?;
        vm.ip(&["addr", "add", "10.0.0.2/30", "dev", "eth0"])?;
        vm.ip(&["route", "add", "default", "via", "10.0.0.1"])?;
        full_checksums(&client.name, "c0")?;
        full_checksums(&vm.name, "eth0")?;
        let dp = Datapath::up(&host.name, &id, &["--uplink", "up0"])?;
        // The peers of veths that receive XDP-redirected or XDP_TX frames run XDP too.
        run_ok(in_ns(
            &client.name,
            dp.boxd.to_str().unwrap(),
            &["bpf", "--pin-dir", dp.pin.to_str().unwrap(), "pass", "c0"],
        ))?;
        run_ok(in_ns(
            &vm.name,
            dp.boxd.to_str().unwrap(),
            &["bpf", "--pin-dir", dp.pin.to_str().unwrap(), "pass", "eth0"],
        ))?;
        let s = Self {
            client,
            host,
            vm,
            dp,
            tag: id,
        };
        let vm_mac = mac(&s.vm.name, "eth0")?;
        s.dp.apply(&json!({
            "vms": [{"id": 7, "public": "203.0.113.7", "state": "running", "port": "tap0", "vm_mac": vm_mac}]
        }))?;
        Ok(s)
    }
}

/// accept() with a deadline, so a test whose traffic never arrives fails instead of
/// hanging.
fn accept_within(l: &TcpListener, within: Duration) -> Result<(TcpStream, std::net::SocketAddr)> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + within;
    loop {
        match l.accept() {
            Ok((c, peer)) => {
                c.set_nonblocking(false)?;
                return Ok((c, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("no connection within {within:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn ping(ns: &str, args: &[&str]) -> Result<std::process::Output> {
    Ok(in_ns(ns, "ping", args).stdin(Stdio::null()).output()?)
}

#[test]
fn a_public_address_reaches_the_vm_and_replies_come_from_it() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let s = Single::new("r")?;
    // ICMP: ARP for the public address answered by XDP, DNAT in, SNAT out.
    let out = ping(&s.client.name, &["-c", "3", "-W", "2", "203.0.113.7"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "ping failed: {text}");
    ensure!(text.contains("from 203.0.113.7"), "{text}");
    assert!(s.dp.stat("arp-replies")? >= 1);

    // TCP, 2 MB up and its hash back: the VM sees the client's real address.
    let vm_ns = s.vm.run(|| {
        let l = TcpListener::bind("10.0.0.2:8080")?;
        let (mut c, peer) = accept_within(&l, WAIT)?;
        c.set_read_timeout(Some(WAIT))?;
        let mut buf = Vec::new();
        let mut len = [0u8; 8];
        c.read_exact(&mut len)?;
        buf.resize(u64::from_be_bytes(len) as usize, 0);
        c.read_exact(&mut buf)?;
        let h = Sha256::digest(&buf);
        c.write_all(&h)?;
        c.write_all(peer.to_string().as_bytes())?;
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let data: Vec<u8> = (0..2_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = Sha256::digest(&data).to_vec();
    let (got, peer) = s
        .client
        .run(move || {
            let mut c = TcpStream::connect_timeout(&"203.0.113.7:8080".parse()?, WAIT)?;
            c.set_read_timeout(Some(WAIT))?;
            c.set_write_timeout(Some(WAIT))?;
            c.write_all(&(data.len() as u64).to_be_bytes())?;
            c.write_all(&data)?;
            let mut h = vec![0u8; 32];
            c.read_exact(&mut h)?;
            let mut peer = String::new();
            c.read_to_string(&mut peer)?;
            Ok((h, peer))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    vm_ns
        .join()
        .map_err(|_| anyhow::anyhow!("vm thread panicked"))??;
    assert_eq!(got, want, "the stream arrived changed");
    assert!(
        peer.starts_with("198.51.100.2:"),
        "the VM saw the client as {peer}"
    );

    // Counters: both directions, per VM and global; the JSON has stable fields.
    let v = s.dp.vm("203.0.113.7")?;
    assert_eq!(v["state"], "running");
    assert_eq!(v["port"], "tap0");
    let c = &v["counters"];
    assert!(c["rx_packets"].as_u64().unwrap() > 1000, "{v}");
    assert!(c["rx_bytes"].as_u64().unwrap() > 2_000_000, "{v}");
    assert!(c["tx_packets"].as_u64().unwrap() > 10, "{v}");
    assert_eq!(c["spoofed"], 0);
    assert!(s.dp.stat("router-local")? > 1000);
    assert!(s.dp.stat("vm-forwarded")? > 10);
    let r = s.dp.json(&["routes"])?;
    assert_eq!(r[0]["via"], "local");
    assert!(r[0]["problem"].is_null(), "{r}");

    // An address nobody has passes to the kernel, which has no route for it.
    let before = s.dp.stat("router-pass")?;
    let out = ping(&s.client.name, &["-c", "1", "-W", "1", "203.0.113.99"])?;
    assert!(!out.status.success());
    assert!(s.dp.stat("router-pass")? > before);
    Ok(())
}

#[test]
fn spoofed_sources_are_dropped_and_counted() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let s = Single::new("s")?;
    // An address the VM gives itself: its packets must not leave.
    s.vm.ip(&["addr", "add", "192.0.2.66/32", "dev", "eth0"])?;
    let out = ping(
        &s.vm.name,
        &["-c", "3", "-W", "1", "-I", "192.0.2.66", "198.51.100.2"],
    )?;
    assert!(!out.status.success(), "a spoofed ping was answered");
    let v = s.dp.vm("203.0.113.7")?;
    assert!(v["counters"]["spoofed"].as_u64().unwrap() >= 3, "{v}");
    assert!(s.dp.stat("vm-spoofed")? >= 3);
    // The VM's own address still works.
    let out = ping(
        &s.vm.name,
        &["-c", "2", "-W", "2", "-I", "10.0.0.2", "198.51.100.2"],
    )?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

#[test]
fn restarting_the_data_path_does_not_drop_traffic() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let s = Single::new("u")?;
    // 400 pings 10 ms apart while `boxd bpf up` runs again three times: each swaps the
    // router and the VM program inside their pinned links.
    let client = s.client.name.clone();
    let pinger = std::thread::spawn(move || {
        in_ns(
            &client,
            "ping",
            &["-c", "400", "-i", "0.01", "-W", "1", "203.0.113.7"],
        )
        .stdin(Stdio::null())
        .output()
    });
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let up = s.dp.json(&["up", "--uplink", "up0"])?;
        assert_eq!(up["router"][0]["action"], "replaced", "{up}");
        assert_eq!(up["ports_replaced"], 1, "{up}");
        assert_eq!(up["maps_reused"], 15, "{up}");
    }
    // Every swap happened with pings in flight: the pinger outlived the last one.
    ensure!(
        !pinger.is_finished(),
        "the pings were over before the last `boxd bpf up`: the swaps were not under traffic"
    );
    let out = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("ping thread"))??;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("400 packets transmitted, 400 received"),
        "packets were lost across restarts: {text}"
    );
    // The VM entry survived in the pinned maps.
    assert_eq!(s.dp.vm("203.0.113.7")?["state"], "running");
    Ok(())
}

/// A wake-event reader (`boxd bpf events --json`) in the background.
struct Events {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<Value>,
}

impl Events {
    fn start(dp: &Datapath, seconds: u32) -> Result<Self> {
        let mut child = dp
            .cmd(&["events", "--json", "--timeout", &seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        // Let it take the ring buffer before traffic starts.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Self { child, rx })
    }

    /// Every event that arrives within `d`.
    fn collect(&self, d: Duration) -> Vec<Value> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(v) => out.push(v),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The data path's half of wake-on-traffic: packets for a paused VM raise one wake
/// event (what `boxd server` turns into a resume; api_machines checks that whole path
/// with a real guest) and are held by its port, in order, until its VMM is back.
#[test]
fn a_packet_for_a_paused_vm_raises_one_wake_event_and_is_held_until_its_vmm_returns() -> Result<()>
{
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let s = Single::new("w")?;
    // The sleeping VM's host port is a real TAP of the vhost-user backend, which holds
    // frames while no VMM is attached.
    let d = NetDaemon::start_in(&format!("w{}", s.tag), Some(&s.host.name))?;
    let tap = format!("bxw{}", s.tag);
    let spec = d.spec("sleepy", &tap);
    let vm_mac = spec.mac.clone();
    d.add(spec)?;
    let vm7 = mac(&s.vm.name, "eth0")?;
    s.dp.apply(&json!({"vms": [
        {"id": 7, "public": "203.0.113.7", "state": "running", "port": "tap0", "vm_mac": vm7},
        {"id": 8, "public": "203.0.113.8", "state": "paused", "port": tap, "vm_mac": vm_mac},
    ]}))?;
    let events = Events::start(&s.dp, 20)?;
    s.client
        .run(|| {
            let u = UdpSocket::bind("198.51.100.2:0")?;
            for i in 0..3 {
                u.send_to(format!("wake-{i}").as_bytes(), "203.0.113.8:9000")?;
                std::thread::sleep(Duration::from_millis(30));
            }
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread"))??;
    let got = events.collect(Duration::from_secs(2));
    assert_eq!(
        got.len(),
        1,
        "one wake event per VM per interval, got {got:?}"
    );
    let e = &got[0];
    assert_eq!(e["public"], "203.0.113.8");
    assert_eq!(e["vm_id"], 8);
    assert_eq!(e["reason"], "packet");
    assert_eq!(e["state"], "paused");
    // All three are held by the port, not dropped.
    d.wait_stats("sleepy", "three frames held", |st| st.held_frames == 3)?;

    // What the worker does on that event: the map says running, the VMM attaches.
    let r = s.dp.json(&["state", "203.0.113.8", "running"])?;
    assert_eq!(r["changed"], true);
    let mut fe = Frontend::connect(&d.dir.join("sleepy.sock"), Options::default())?;
    for i in 0..3 {
        let f = fe
            .recv(0, WAIT)?
            .with_context(|| format!("held frame {i} never came"))?;
        let f = &f[VNET_HDR_LEN..];
        assert_eq!(
            &f[0..6],
            &parse_mac(&vm_mac)[..],
            "frame {i} not addressed to the VM"
        );
        assert_eq!(&f[14 + 16..14 + 20], &[10, 0, 0, 2], "frame {i} not DNATed");
        assert_eq!(&f[14 + 20 + 2..14 + 20 + 4], &9000u16.to_be_bytes());
        assert_eq!(
            &f[14 + 28..],
            format!("wake-{i}").as_bytes(),
            "frame {i} out of order"
        );
        assert!(
            boxd_tests::pkt::udp_checksum_ok(f),
            "frame {i}: bad UDP checksum after DNAT"
        );
    }
    // Running now: no more events.
    s.client
        .run(|| {
            let u = UdpSocket::bind("198.51.100.2:0")?;
            u.send_to(b"awake", "203.0.113.8:9000")?;
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread"))??;
    let f = fe.recv(0, WAIT)?.context("a packet for the running VM")?;
    assert_eq!(&f[VNET_HDR_LEN + 42..], b"awake");
    assert!(events.collect(Duration::from_millis(500)).is_empty());
    assert_eq!(s.dp.vm("203.0.113.8")?["counters"]["wakes"], 1);
    Ok(())
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("mac");
    }
    m
}

#[test]
fn bad_desired_states_are_refused_and_change_nothing() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let s = Single::new("b")?;
    let before = s.dp.json(&["vms"])?;
    let cases = [
        (
            json!({"vms": [{"id": 9, "public": "203.0.113.9", "state": "running", "port": "nosuchdev"}]}),
            "does not exist",
        ),
        (
            json!({"vms": [{"id": 9, "public": "203.0.113.9", "state": "dozing", "port": "tap0"}]}),
            "not one of",
        ),
        (
            json!({"vms": [{"id": 9, "public": "203.0.113.9", "state": "running", "node": 4}]}),
            "not in \"nodes\"",
        ),
        (
            json!({"vms": [], "domains": [{"name": "x.example", "public": "203.0.113.9"}]}),
            "no VM has",
        ),
        (json!({"vmz": []}), "unknown field"),
    ];
    for (d, want) in cases {
        let f = std::env::temp_dir().join(format!("bx-bad-{}.json", s.tag));
        std::fs::write(&f, serde_json::to_vec(&d)?)?;
        let out = s.dp.cmd(&["apply", f.to_str().unwrap()]).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {d}");
        assert!(err.contains(want), "{err:?} should say {want:?}");
        assert_eq!(
            s.dp.json(&["vms"])?,
            before,
            "a refused state changed the maps"
        );
    }
    // Not set up: a clear hint.
    let out = in_ns(
        &s.host.name,
        s.dp.boxd.to_str().unwrap(),
        &["bpf", "--pin-dir", "/sys/fs/bpf/boxd-nothing-here", "vms"],
    )
    .output()?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("boxd bpf up"));
    // The same state twice: the second apply changes nothing.
    let vm_mac = mac(&s.vm.name, "eth0")?;
    let d = json!({"vms": [{"id": 7, "public": "203.0.113.7", "state": "running", "port": "tap0", "vm_mac": vm_mac}]});
    let r = s.dp.apply(&d)?;
    assert_eq!(r["changes"].as_array().map(Vec::len), Some(0), "{r}");
    // Removing the VM removes its port attachment too.
    let r = s.dp.apply(&json!({}))?;
    let kinds: Vec<_> = r["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["op"].as_str().unwrap(),
                c["kind"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        kinds.contains(&"remove vm".to_string()) && kinds.contains(&"remove port".to_string()),
        "{kinds:?}"
    );
    ensure!(
        !s.dp
            .pin
            .join("links")
            .read_dir()?
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("tc-"))),
        "TC link left behind"
    );
    Ok(())
}

#[test]
fn a_cluster_encapsulates_to_the_worker_and_back_through_the_edge() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    // client -- edge (uplink up0, private pr0 10.1.0.1) -- worker (pr1 10.1.0.2) -- vm
    let id = format!("{}k", std::process::id() % 100_000);
    let client = Netns::new(&format!("bxc{id}"))?;
    let edge = Netns::new(&format!("bxe{id}"))?;
    let worker = Netns::new(&format!("bxw{id}"))?;
    let vm = Netns::new(&format!("bxv{id}"))?;
    veth(&client.name, "c0", &edge.name, "up0")?;
    veth(&edge.name, "pr0", &worker.name, "pr1")?;
    // Encapsulation adds 20 bytes: the private network carries full-size uplink
    // packets plus that (as a datacenter network with jumbo frames does).
    edge.ip(&["link", "set", "pr0", "mtu", "1600"])?;
    worker.ip(&["link", "set", "pr1", "mtu", "1600"])?;
    veth(&worker.name, "tap0", &vm.name, "eth0")?;
    client.ip(&["addr", "add", "198.51.100.2/24", "dev", "c0"])?;
    client.ip(&["route", "add", "203.0.113.0/24", "dev", "c0"])?;
    edge.ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"])?;
    edge.ip(&["addr", "add", "10.1.0.1/24", "dev", "pr0"])?;
    worker.ip(&["addr", "add", "10.1.0.2/24", "dev", "pr1"])?;
    worker.ip(&["addr", "add", "10.0.0.1/30", "dev", "tap0"])?;
    vm.ip(&["addr", "add", "10.0.0.2/30", "dev", "eth0"])?;
    vm.ip(&["route", "add", "default", "via", "10.0.0.1"])?;
    full_checksums(&client.name, "c0")?;
    full_checksums(&vm.name, "eth0")?;
    let e = Datapath::up(
        &edge.name,
        &format!("{id}e"),
        &[
            "--uplink",
            "up0",
            "--private",
            "pr0",
            "--node-id",
            "1",
            "--node-addr",
            "10.1.0.1",
        ],
    )?;
    let w = Datapath::up(
        &worker.name,
        &format!("{id}w"),
        &[
            "--uplink",
            "pr1",
            "--node-id",
            "2",
            "--node-addr",
            "10.1.0.2",
            "--no-edge",
            "--edge-node",
            "1",
        ],
    )?;
    for (ns, dev) in [(&client.name, "c0"), (&vm.name, "eth0")] {
        run_ok(in_ns(
            ns,
            e.boxd.to_str().unwrap(),
            &["bpf", "--pin-dir", e.pin.to_str().unwrap(), "pass", dev],
        ))?;
    }
    let vm_mac = mac(&vm.name, "eth0")?;
    e.apply(&json!({
        "nodes": [{"id": 2, "addr": "10.1.0.2"}],
        "vms": [{"id": 9, "public": "203.0.113.9", "node": 2, "state": "running"}],
    }))?;
    w.apply(&json!({
        "nodes": [{"id": 1, "addr": "10.1.0.1"}],
        "vms": [{"id": 9, "public": "203.0.113.9", "node": 2, "state": "running", "port": "tap0", "vm_mac": vm_mac}],
    }))?;
    let r = e.json(&["routes"])?;
    assert_eq!(
        (r[0]["via"].as_str(), r[0]["node_addr"].as_str()),
        (Some("encap"), Some("10.1.0.2")),
        "{r}"
    );
    // Neighbours between the nodes resolve through the kernel on first use; then the
    // whole path is XDP/TC.
    let out = ping(
        &client.name,
        &["-c", "5", "-i", "0.2", "-W", "2", "203.0.113.9"],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("from 203.0.113.9"),
        "no reply through the cluster: {text}"
    );
    ensure!(
        text.contains(" 0% packet loss")
            || text.contains(", 5 received")
            || text.contains(", 4 received"),
        "{text}"
    );
    assert!(e.stat("router-encap")? >= 4, "edge did not encapsulate");
    assert!(w.stat("router-decap")? >= 4, "worker did not decapsulate");
    assert!(
        w.stat("vm-encap")? >= 4,
        "worker did not send replies back to the edge"
    );
    assert!(
        e.stat("router-decap")? >= 4,
        "edge did not take the replies"
    );
    // A TCP stream both ways across the two nodes.
    let vm_t = vm.run(|| {
        let l = TcpListener::bind("10.0.0.2:8081")?;
        let (mut c, _) = accept_within(&l, WAIT)?;
        let mut buf = vec![0u8; 300_000];
        c.set_read_timeout(Some(WAIT))?;
        c.read_exact(&mut buf)?;
        c.write_all(&Sha256::digest(&buf))?;
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(200));
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    let want = Sha256::digest(&data).to_vec();
    let got = client
        .run(move || {
            let mut c = TcpStream::connect_timeout(&"203.0.113.9:8081".parse()?, WAIT)?;
            c.set_read_timeout(Some(WAIT))?;
            c.set_write_timeout(Some(WAIT))?;
            c.write_all(&data)?;
            let mut h = vec![0u8; 32];
            c.read_exact(&mut h)?;
            Ok(h)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread"))??;
    vm_t.join().map_err(|_| anyhow::anyhow!("vm thread"))??;
    assert_eq!(got, want);
    Ok(())
}

/// The SNI parser on a real client's ClientHello to the proxy address: it records which
/// machine (and node) the connection is for, keyed by the connection, and raises a wake
/// event for the paused machine. (The proxy acting on both, with a real guest, is
/// api_machines.)
#[test]
fn a_client_hello_to_the_proxy_address_records_its_machine_and_raises_a_wake_event() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    if let Some(why) = boxd_tests::missing_tools(&["curl"]) {
        boxd_tests::skip!("{why}");
    }
    let s = Single::new("t")?;
    // The proxy address lives on the host; a TLS listener stands in for the proxy.
    s.host
        .ip(&["addr", "add", "198.51.100.10/32", "dev", "up0"])?;
    let vm_mac = mac(&s.vm.name, "eth0")?;
    s.dp.apply(&json!({
        "vms": [{"id": 7, "public": "203.0.113.7", "state": "paused", "port": "tap0", "vm_mac": vm_mac}],
        "domains": [{"name": "my-app.boxd.example", "public": "203.0.113.7"}],
        "proxies": ["198.51.100.10"],
    }))?;
    s.client
        .ip(&["route", "add", "198.51.100.10/32", "dev", "c0"])?;
    let events = Events::start(&s.dp, 30)?;
    // A TCP listener that records the ClientHello's connection and answers nothing:
    // the steering decision is taken from the first segments alone.
    let host = s.host.run(|| {
        let l = TcpListener::bind("198.51.100.10:443")?;
        let (mut c, peer) = accept_within(&l, WAIT)?;
        c.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf);
        Ok(peer)
    });
    std::thread::sleep(Duration::from_millis(200));
    let _ = in_ns(
        &s.client.name,
        "curl",
        &[
            "-sk",
            "--max-time",
            "3",
            "https://My-App.boxd.example/",
            "--resolve",
            "my-app.boxd.example:443:198.51.100.10",
        ],
    )
    .stdin(Stdio::null())
    .output()?;
    let peer = host.join().map_err(|_| anyhow::anyhow!("listener"))??;
    let got = events.collect(Duration::from_secs(2));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["reason"], "sni");
    assert_eq!(got[0]["public"], "203.0.113.7");
    assert!(s.dp.stat("sni-found")? >= 1);
    // The steering decision, keyed by the connection, as the proxy will read it.
    let pin = boxd_datapath::PinDir(s.dp.pin.clone());
    let std::net::SocketAddr::V4(peer) = peer else {
        bail!("IPv4 peer expected")
    };
    let steer = boxd_datapath::tables::steer(&pin, peer, "198.51.100.10:443".parse()?)?
        .context("no steering entry for the connection")?;
    assert_eq!(
        boxd_datapath::key_addr(steer.public_addr).to_string(),
        "203.0.113.7"
    );
    assert_eq!(steer.vm_id, 7);
    assert_eq!(steer.node, 1);
    Ok(())
}
