//! The network backend driven without a VM: the real `boxd net serve` daemon, real TAP
//! devices and the host's real network stack on one side, the in-repo vhost-user test
//! frontend on the other. Needs root and /dev/net/tun (no KVM).

use anyhow::{Context, Result, ensure};
use boxd_tests::net::{NetDaemon, Netns, PacketSocket, wait_link};
use boxd_tests::pkt::{self, FrontendLink, GUEST_IP, GUEST_MAC, GuestTcp, HOST_IP, VNET_HDR_LEN};
use boxd_vhost_net::control::{Client, Request};
use boxd_vhost_net::frontend::{Frontend, Options, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(5);
const BROADCAST: [u8; 6] = [0xff; 6];

fn vnet(frame: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(frame);
    f
}

/// A UDP frame from the guest to the host with payload `p`.
fn guest_udp(p: &[u8]) -> Vec<u8> {
    vnet(&pkt::udp_frame(
        GUEST_MAC,
        BROADCAST,
        (GUEST_IP, 5000),
        (HOST_IP, 6000),
        p,
    ))
}

/// A UDP frame from the host to the guest with payload `p`, source port `sport`.
fn host_udp(sport: u16, p: &[u8]) -> Vec<u8> {
    pkt::udp_frame(
        [2, 0, 0, 0, 0, 1],
        GUEST_MAC,
        (HOST_IP, sport),
        (GUEST_IP, 7000),
        p,
    )
}

/// The next frame the frontend receives on `pair` whose Ethernet part satisfies
/// `want` (the host may send other things, e.g. ARP).
fn recv_where(fe: &mut Frontend, pair: usize, want: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(f) = fe.recv(pair, Duration::from_millis(50))?
            && f.len() > VNET_HDR_LEN
            && want(&f[VNET_HDR_LEN..])
        {
            return Ok(f);
        }
    }
    anyhow::bail!("no matching frame on pair {pair} within {WAIT:?}")
}

fn udp_payload(eth: &[u8]) -> Option<&[u8]> {
    (eth.len() >= 42 && eth[12..14] == [8, 0] && eth[23] == 17).then(|| &eth[42..])
}

#[test]
fn frames_cross_both_ways_and_spoofed_ones_are_dropped_and_counted() -> Result<()> {
    let d = NetDaemon::start("both")?;
    d.add(d.spec("both", "bxt-both"))?;
    let host = PacketSocket::open("bxt-both")?;
    let mut fe = Frontend::connect(&d.dir.join("both.sock"), Options::default())?;

    // Guest to host: the same bytes come out of the TAP.
    let hello = guest_udp(b"hello from the guest");
    fe.send(0, &hello)?;
    let got = host
        .recv(WAIT)?
        .context("guest frame never reached the TAP")?;
    assert_eq!(got, hello[VNET_HDR_LEN..], "frame changed on the way out");

    // Spoofed and foreign frames never reach the host; a marker sent after them does.
    let other_mac = [2, 0, 0, 0, 0, 9];
    let spoofs = [
        vnet(&pkt::udp_frame(
            other_mac,
            BROADCAST,
            (GUEST_IP, 1),
            (HOST_IP, 2),
            b"mac",
        )),
        vnet(&pkt::udp_frame(
            GUEST_MAC,
            BROADCAST,
            ([10, 0, 0, 3], 1),
            (HOST_IP, 2),
            b"ip",
        )),
        {
            let mut a = pkt::arp_reply([2, 0, 0, 0, 0, 1], HOST_IP);
            a[VNET_HDR_LEN + 28..VNET_HDR_LEN + 32].copy_from_slice(&[10, 0, 0, 1]);
            a
        },
        {
            let mut f = vnet(&pkt::udp_frame(
                GUEST_MAC,
                BROADCAST,
                (GUEST_IP, 1),
                (HOST_IP, 2),
                b"v6",
            ));
            f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&0x86ddu16.to_be_bytes());
            f
        },
        vnet(&GUEST_MAC),
    ];
    for s in &spoofs {
        fe.send(0, s)?;
    }
    let marker = guest_udp(b"marker");
    fe.send(0, &marker)?;
    let got = host.recv(WAIT)?.context("marker never arrived")?;
    assert_eq!(got, marker[VNET_HDR_LEN..], "a spoofed frame got through");
    let s = d.wait_stats("both", "drops counted", |s| s.tx_packets == 2)?;
    assert_eq!(
        (
            s.tx_drop_spoofed_mac,
            s.tx_drop_spoofed_ip,
            s.tx_drop_spoofed_arp,
            s.tx_drop_ethertype,
            s.tx_drop_runt
        ),
        (1, 1, 1, 1, 1),
        "{s:#?}"
    );

    // Host to guest: the frame arrives whole behind a virtio-net header.
    let down = host_udp(9000, b"hello from the host");
    host.send(&down)?;
    let f = recv_where(&mut fe, 0, |e| {
        udp_payload(e) == Some(b"hello from the host")
    })?;
    assert_eq!(f[VNET_HDR_LEN..], down[..]);
    let s = d.stats("both")?;
    assert!(
        s.attached && s.rx_packets >= 1 && s.connections == 1,
        "{s:#?}"
    );
    Ok(())
}

#[test]
fn tcp_streams_with_checksum_and_segmentation_offload_both_ways() -> Result<()> {
    let d = NetDaemon::start("tcp")?;
    d.add(d.spec("tcp", "bxt-tcp"))?;
    wait_link("bxt-tcp")?;
    let host_mac = pkt_mac("bxt-tcp")?;
    let ns = Netns::new("bxt-tcp")?;
    ns.adopt("bxt-tcp", "10.0.0.1/30")?;
    let mut fe = Frontend::connect(&d.dir.join("tcp.sock"), Options::default())?;
    assert!(fe.mergeable(), "mergeable rx buffers not negotiated");

    // Guest to host: 2 MiB in 60000-byte TSO segments with offloaded checksums.
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i * 31 + i / 977) as u8).collect();
    let want = Sha256::digest(&data);
    let server = ns.run(|| {
        let l = std::net::TcpListener::bind("10.0.0.1:7000")?;
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut link = FrontendLink {
        fe: &mut fe,
        pair: 0,
    };
    let mut tcp = GuestTcp {
        link: &mut link,
        host_mac,
        deadline: Instant::now() + Duration::from_secs(30),
        gso_frames: 0,
        largest: 0,
    };
    tcp.send_stream(40000, 7000, &data, 60000)?;
    let got = server.join().expect("server thread")?;
    assert_eq!(got.len(), data.len(), "host received a different length");
    assert_eq!(Sha256::digest(&got), want, "host received different bytes");

    // Host to guest: the host's TSO reaches the guest as large GSO frames spread over
    // mergeable buffers.
    let sent: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let sent2 = sent.clone();
    let client = ns.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(
            &"10.0.0.2:8000".parse()?,
            Duration::from_secs(10),
        )?;
        s.write_all(&sent2)?;
        Ok(())
    });
    tcp.deadline = Instant::now() + Duration::from_secs(30);
    let got = tcp.accept_stream(8000, 4 << 20)?;
    client.join().expect("client thread")?;
    assert_eq!(got.len(), sent.len());
    assert_eq!(
        Sha256::digest(&got),
        Sha256::digest(&sent),
        "guest received different bytes"
    );
    assert!(
        tcp.gso_frames > 0,
        "no GSO frame reached the guest (largest {} bytes)",
        tcp.largest
    );
    assert!(
        tcp.largest > 4096,
        "no frame needed more than one rx buffer"
    );
    Ok(())
}

fn pkt_mac(dev: &str) -> Result<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{dev}/address"))?;
    boxd_vhost_net::control::parse_mac(s.trim()).context("TAP MAC")
}

#[test]
fn multiqueue_spreads_flows_over_queue_pairs() -> Result<()> {
    const PAIRS: usize = 4;
    let d = NetDaemon::start("mq")?;
    let mut spec = d.spec("mq", "bxt-mq");
    spec.queue_pairs = PAIRS;
    d.add(spec)?;
    let host = PacketSocket::open("bxt-mq")?;
    let mut fe = Frontend::connect(
        &d.dir.join("mq.sock"),
        Options {
            pairs: PAIRS,
            ..Options::default()
        },
    )?;
    // Every pair transmits.
    for p in 0..PAIRS {
        fe.send(p, &guest_udp(format!("from pair {p}").as_bytes()))?;
    }
    let mut seen = Vec::new();
    while seen.len() < PAIRS {
        let f = host
            .recv(WAIT)?
            .context("a pair's frame never reached the TAP")?;
        if let Some(p) = udp_payload(&f) {
            seen.push(String::from_utf8_lossy(p).to_string());
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..PAIRS)
            .map(|p| format!("from pair {p}"))
            .collect::<Vec<_>>()
    );

    // 64 flows from the host land on several receive queues, none lost.
    const FLOWS: u16 = 64;
    for f in 0..FLOWS {
        host.send(&host_udp(10_000 + f, &f.to_be_bytes()))?;
    }
    let mut per_pair = [0usize; PAIRS];
    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < usize::from(FLOWS) && Instant::now() < deadline {
        for (p, n) in per_pair.iter_mut().enumerate() {
            while let Some(f) = fe.try_recv(p)? {
                if let Some(pl) = udp_payload(&f[VNET_HDR_LEN..])
                    && pl.len() == 2
                {
                    got.insert(u16::from_be_bytes([pl[0], pl[1]]));
                    *n += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        got.len(),
        usize::from(FLOWS),
        "flows lost; per pair {per_pair:?}"
    );
    let used = per_pair.iter().filter(|n| **n > 0).count();
    assert!(used >= 2, "all flows on one queue: {per_pair:?}");
    Ok(())
}

#[test]
fn frames_for_an_absent_frontend_are_held_in_order_up_to_the_bound() -> Result<()> {
    let d = NetDaemon::start("hold")?;
    let mut spec = d.spec("hold", "bxt-hold");
    spec.hold_frames = 64;
    d.add(spec)?;
    let host = PacketSocket::open("bxt-hold")?;
    let sock = d.dir.join("hold.sock");
    {
        let mut fe = Frontend::connect(&sock, Options::default())?;
        host.send(&host_udp(1, b"first"))?;
        recv_where(&mut fe, 0, |e| udp_payload(e) == Some(b"first"))?;
        // The frontend crashes (its socket closes without a goodbye).
    }
    d.wait_stats("hold", "the frontend to be gone", |s| !s.attached)?;
    // Whoever wakes VMs hears about the waiting frames once, not per frame.
    let (events_tx, events) = std::sync::mpsc::channel();
    let watcher = d.client()?.watch()?;
    std::thread::spawn(move || {
        for e in watcher {
            if events_tx.send(e).is_err() {
                break;
            }
        }
    });
    for i in 0..100u32 {
        host.send(&host_udp(2, &i.to_be_bytes()))?;
    }
    let e = events.recv_timeout(WAIT)?.context("event stream")?;
    assert_eq!((e.event.as_str(), e.port.as_str()), ("waiting", "hold"));
    assert!(
        events.recv_timeout(Duration::from_millis(500)).is_err(),
        "more than one event for one absence"
    );
    let s = d.wait_stats("hold", "100 frames held or dropped", |s| {
        s.held_frames + s.rx_drop_hold_full as usize >= 100
    })?;
    assert_eq!((s.held_frames, s.rx_drop_hold_full), (64, 36), "{s:#?}");

    // A new frontend (the restarted VMM) gets the first 64, in order.
    let mut fe = Frontend::connect(&sock, Options::default())?;
    for i in 0..64u32 {
        let f = recv_where(&mut fe, 0, |e| udp_payload(e).is_some_and(|p| p.len() == 4))?;
        let p = udp_payload(&f[VNET_HDR_LEN..]).expect("udp");
        assert_eq!(
            u32::from_be_bytes(p.try_into()?),
            i,
            "held frames out of order"
        );
    }
    let s = d.wait_stats("hold", "the hold to drain", |s| s.held_frames == 0)?;
    assert!(s.attached && s.connections == 2, "{s:#?}");
    // And traffic flows as usual afterwards.
    host.send(&host_udp(3, b"after"))?;
    recv_where(&mut fe, 0, |e| udp_payload(e) == Some(b"after"))?;
    Ok(())
}

#[test]
fn malformed_descriptors_are_refused_without_harm_to_the_port_or_others() -> Result<()> {
    let mut d = NetDaemon::start("bad")?;
    d.add(d.spec("bad", "bxt-bad"))?;
    d.add(d.spec("good", "bxt-good"))?;
    let host_bad = PacketSocket::open("bxt-bad")?;
    let host_good = PacketSocket::open("bxt-good")?;
    let mut bad = Frontend::connect(&d.dir.join("bad.sock"), Options::default())?;
    let mut good = Frontend::connect(&d.dir.join("good.sock"), Options::default())?;
    let txq = 1;
    let mem_end = 1u64 << 40;

    let mut chains = 0;
    let mut push = |fe: &mut Frontend, descs: &[(u64, u32, u16, u16)]| -> Result<()> {
        let ids: Vec<u16> = (0..descs.len())
            .map(|_| fe.take_tx_desc(0).expect("free descriptor"))
            .collect();
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            // `next` indexes into `ids` (u16::MAX: a raw, out-of-range index).
            let next = if *next == u16::MAX {
                300
            } else {
                ids[usize::from(*next)]
            };
            fe.write_desc(txq, ids[i], *addr, *len, *flags, next);
        }
        fe.push_avail(txq, ids[0]);
        chains += 1;
        Ok(())
    };
    let slot = bad.tx_slot(0, 200);
    // Out-of-range address; a loop; a link past the table; an oversized chain; a
    // device-writable descriptor in a transmit chain.
    push(&mut bad, &[(mem_end, 100, 0, 0)])?;
    push(
        &mut bad,
        &[
            (slot, 60, VRING_DESC_F_NEXT, 1),
            (slot, 60, VRING_DESC_F_NEXT, 0),
        ],
    )?;
    push(&mut bad, &[(slot, 60, VRING_DESC_F_NEXT, u16::MAX)])?;
    push(
        &mut bad,
        &[(slot, 40_000, VRING_DESC_F_NEXT, 1), (slot, 40_000, 0, 0)],
    )?;
    push(&mut bad, &[(slot, 60, VRING_DESC_F_WRITE, 0)])?;
    bad.kick(txq)?;
    let s = d.wait_stats("bad", "malformed chains counted", |s| {
        s.tx_drop_malformed == 5
    })?;
    assert_eq!(s.tx_packets, 0, "{s:#?}");
    assert_eq!(chains, 5);

    // A receive buffer outside guest memory is handed back unused; the frame goes
    // into the next one.
    bad.write_desc(0, 0, mem_end, 4096, VRING_DESC_F_WRITE, 0);
    host_bad.send(&host_udp(4, b"past the bad buffer"))?;
    recv_where(&mut bad, 0, |e| {
        udp_payload(e) == Some(b"past the bad buffer")
    })?;
    assert_eq!(d.stats("bad")?.rx_drop_malformed, 1);
    // A bad buffer between good ones while a frame spans several (mergeable): it goes
    // back empty before the frame's buffers, and the frame arrives whole. Buffers 0
    // and 1 were used and posted again at the end, so 2, 3, 4 come next.
    let mtu = std::process::Command::new("ip")
        .args(["link", "set", "bxt-bad", "mtu", "9000"])
        .status()?;
    ensure!(mtu.success(), "ip link set mtu");
    bad.write_desc(0, 3, mem_end, 4096, VRING_DESC_F_WRITE, 0);
    let big = vec![0x42u8; 6000];
    host_bad.send(&host_udp(5, &big))?;
    let f = recv_where(&mut bad, 0, |e| {
        udp_payload(e).is_some_and(|p| p.len() == big.len())
    })?;
    assert_eq!(
        udp_payload(&f[VNET_HDR_LEN..]),
        Some(&big[..]),
        "frame damaged"
    );
    assert_eq!(d.stats("bad")?.rx_drop_malformed, 2);

    // The port still works both ways, the other port never noticed, the daemon lives.
    let ok = guest_udp(b"still fine");
    bad.send(0, &ok)?;
    assert_eq!(
        host_bad.recv(WAIT)?.context("port stopped working")?,
        ok[VNET_HDR_LEN..]
    );
    let other = guest_udp(b"other port");
    good.send(0, &other)?;
    assert_eq!(
        host_good.recv(WAIT)?.context("other port broken")?,
        other[VNET_HDR_LEN..]
    );
    let g = d.stats("good")?;
    assert_eq!(
        (g.tx_drop_malformed, g.ring_errors, g.tx_packets),
        (0, 0, 1),
        "{g:#?}"
    );
    assert!(d.alive(), "daemon died: {}", d.log());
    Ok(())
}

#[test]
fn control_socket_refuses_bad_requests_and_changes_nothing() -> Result<()> {
    let d = NetDaemon::start("ctl")?;
    d.add(d.spec("ctl", "bxt-ctl"))?;
    let mut c = d.client()?;
    let before = c.call(&Request::List)?.ports;
    let refused =
        |mut f: Box<dyn FnMut(&mut boxd_vhost_net::PortSpec)>, what: &str| -> Result<()> {
            let mut spec = d.spec("other", "bxt-ctl2");
            f(&mut spec);
            let r = d.add(spec);
            ensure!(r.is_err(), "{what} was accepted");
            let msg = r.unwrap_err().to_string();
            ensure!(!msg.is_empty(), "{what}: empty error");
            Ok(())
        };
    refused(Box::new(|s| s.name = "ctl".into()), "a duplicate name")?;
    refused(Box::new(|s| s.tap = "bxt-ctl".into()), "a duplicate TAP")?;
    refused(Box::new(|s| s.name = "Not_A_Label".into()), "a bad name")?;
    refused(
        Box::new(|s| s.tap = "a-tap-name-that-is-too-long".into()),
        "a long TAP name",
    )?;
    refused(
        Box::new(|s| s.mac = "ff:ff:ff:ff:ff:ff".into()),
        "a broadcast MAC",
    )?;
    refused(Box::new(|s| s.mac = "nonsense".into()), "a bad MAC")?;
    refused(Box::new(|s| s.ip = "10.0.0.256".into()), "a bad IP")?;
    refused(Box::new(|s| s.queue_pairs = 0), "zero queue pairs")?;
    refused(Box::new(|s| s.queue_pairs = 1000), "1000 queue pairs")?;
    refused(Box::new(|s| s.hold_bytes = 1 << 40), "a 1 TiB hold")?;
    refused(
        Box::new(|s| s.socket = "relative.sock".into()),
        "a relative socket path",
    )?;
    refused(
        Box::new(|s| s.socket = "/nonexistent/dir/x.sock".into()),
        "a missing directory",
    )?;
    // A path that holds something else is never deleted to make way for a socket.
    let precious = d.dir.join("precious.txt");
    std::fs::write(&precious, "keep me")?;
    let p2 = precious.clone();
    refused(
        Box::new(move |s| s.socket = p2.clone()),
        "a regular file as the socket",
    )?;
    assert_eq!(std::fs::read_to_string(&precious)?, "keep me");
    assert!(
        !std::path::Path::new("/sys/class/net/bxt-ctl2").exists(),
        "a refused port left its TAP"
    );

    // Garbage and oversized lines get an error line back; the connection stays usable.
    let mut raw = std::os::unix::net::UnixStream::connect(&d.control)?;
    raw.set_read_timeout(Some(WAIT))?;
    let mut reader = std::io::BufReader::new(raw.try_clone()?);
    for bad in [&b"{\"op\":\"explode\"}\n"[..], b"not json\n"] {
        raw.write_all(bad)?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line)?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        assert_eq!(v["ok"], false, "{line}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("op")),
            "{line}"
        );
    }
    let mut huge = vec![b' '; 100 << 10];
    huge.push(b'\n');
    raw.write_all(&huge)?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line)?;
    assert!(line.contains("longer than"), "{line}");

    assert!(
        c.call(&Request::RemovePort {
            name: "nope".into()
        })
        .is_err()
    );
    assert_eq!(
        Client::connect(&d.control)?.call(&Request::List)?.ports,
        before
    );

    // The CLI reads the same counters; removing the port removes its TAP and socket.
    let boxd = boxd_tests::guest::boxd_binary()?;
    let out = std::process::Command::new(&boxd)
        .args(["net", "stats", "--json", "--control"])
        .arg(&d.control)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v[0]["name"], "ctl");
    assert_eq!(v[0]["rx_drop_hold_full"], 0);
    let out = std::process::Command::new(&boxd)
        .args(["net", "stats", "--control"])
        .arg(&d.control)
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("NAME") && table.contains("ctl"),
        "{table}"
    );
    c.call(&Request::RemovePort { name: "ctl".into() })?;
    assert!(!d.dir.join("ctl.sock").exists(), "socket left behind");
    let deadline = Instant::now() + WAIT;
    while std::path::Path::new("/sys/class/net/bxt-ctl").exists() {
        ensure!(Instant::now() < deadline, "TAP left behind");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn a_guest_that_stops_taking_frames_gets_them_later_in_order() -> Result<()> {
    // A paused VM keeps its rings but drains nothing: the port fills the guest's
    // receive buffers, then holds the rest, and delivers everything in order once the
    // guest takes frames again.
    const FRAMES: u32 = 400;
    let d = NetDaemon::start("stall")?;
    d.add(d.spec("stall", "bxt-stall"))?;
    let host = PacketSocket::open("bxt-stall")?;
    let mut fe = Frontend::connect(&d.dir.join("stall.sock"), Options::default())?;
    host.send(&host_udp(1, b"first"))?;
    recv_where(&mut fe, 0, |e| udp_payload(e) == Some(b"first"))?;
    // The guest stops reading; 400 frames arrive.
    for i in 0..FRAMES {
        host.send(&host_udp(2, &i.to_be_bytes()))?;
    }
    let ring = boxd_vhost_net::QUEUE_SIZE;
    let s = d.wait_stats("stall", "the ring to fill and the rest to be held", |s| {
        s.held_frames + ring >= FRAMES as usize
    })?;
    assert!(s.attached, "{s:#?}");
    assert_eq!(s.rx_drop_hold_full, 0, "{s:#?}");
    // The guest reads again: every frame, in order.
    for i in 0..FRAMES {
        let f = recv_where(&mut fe, 0, |e| udp_payload(e).is_some_and(|p| p.len() == 4))?;
        let p = udp_payload(&f[VNET_HDR_LEN..]).expect("udp");
        assert_eq!(u32::from_be_bytes(p.try_into()?), i, "frames out of order");
    }
    let s = d.wait_stats("stall", "the hold to drain", |s| s.held_frames == 0)?;
    assert!(s.rx_held >= u64::from(FRAMES) - ring as u64, "{s:#?}");
    Ok(())
}
