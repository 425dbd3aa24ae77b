//! `cargo xtask bench net` (release build): the network backend's figures, each beside
//! a peer's from the same run, as `BENCH` lines.
//!
//! - Frame rates, guest to host, with the test frontend: 64-byte and 1500-byte frames
//!   through our backend on one and two queue pairs. Peer: the same frames written
//!   straight into a TAP by one thread, with no vrings at all (the ceiling of any
//!   TAP-backed backend on this machine; a ratio near 1 means the vring path costs
//!   little).
//! - A TCP stream from the guest side to the host's TCP stack in 60000-byte TSO
//!   segments with offloaded checksums. Same peer.
//! - UDP round trips to an echo server on the host: p50/p99, and the latency the
//!   backend adds (half the difference to the peer's round trip).
//! - Guest TCP (iperf3) from a Debian guest on QEMU (software CPU) through our backend
//!   vs through QEMU's own TAP backend, the issue's `net-guest-tcp`.

use anyhow::{Context, Result, bail};
use boxd_tests::bench::{self, Better, Side};
use boxd_tests::net::{NetDaemon, Netns, wait_link};
use boxd_tests::pkt::{
    self, FrontendLink, GUEST_IP, GUEST_MAC, GuestTcp, HOST_IP, Link, TapLink, VNET_HDR_LEN,
};
use boxd_tests::qemu::{GuestNet, Qemu};
use boxd_vhost_net::frontend::{Frontend, Options};
use std::io::Read;
use std::time::{Duration, Instant};

const NOBODY: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

fn frame(len: usize) -> Vec<u8> {
    // Ethernet + IPv4 + UDP = 42 bytes of headers; the payload fills up to `len`.
    let payload = vec![0xab; len - 42];
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&pkt::udp_frame(
        GUEST_MAC,
        NOBODY,
        (GUEST_IP, 5000),
        (HOST_IP, 9),
        &payload,
    ));
    f
}

/// Queues `f` as fast as the link takes it for `secs`; returns frames accepted.
fn flood(link: &mut dyn Link, f: &[u8], secs: f64) -> Result<u64> {
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            if !link.queue(f)? {
                break;
            }
            sent += 1;
        }
        link.flush()?;
    }
    Ok(sent)
}

/// Every queue pair of one frontend in turn, as one [`Link`] (transmit only).
struct RoundRobin<'a> {
    fe: &'a mut Frontend,
    next: usize,
}

impl Link for RoundRobin<'_> {
    fn queue(&mut self, frame: &[u8]) -> Result<bool> {
        let pairs = self.fe.pairs();
        for _ in 0..pairs {
            let p = self.next;
            self.next = (self.next + 1) % pairs;
            if self.fe.queue_tx(p, frame)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
    fn flush(&mut self) -> Result<()> {
        for p in 0..self.fe.pairs() {
            self.fe.flush(2 * p + 1)?;
        }
        Ok(())
    }
    fn recv(&mut self, _: Duration) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn rx_ready(&mut self) -> bool {
        false
    }
}

/// What a frame-rate round sent and what the backend counted as lost.
#[derive(Default)]
struct Tally {
    sent: u64,
    lost: u64,
}

/// Drops and errors a port counted (any of them is a frame the guest sent and lost).
fn losses(st: &boxd_vhost_net::PortStats) -> u64 {
    st.tx_drop_runt
        + st.tx_drop_spoofed_mac
        + st.tx_drop_spoofed_ip
        + st.tx_drop_spoofed_arp
        + st.tx_drop_ethertype
        + st.tx_drop_malformed
        + st.tx_errors
        + st.ring_errors
}

/// One port of our backend with its frontend, and the same TAP written directly.
struct FramePort {
    name: String,
    fe: Frontend,
    tap: TapLink,
    frame: Vec<u8>,
}

impl FramePort {
    fn new(d: &NetDaemon, len: usize, pairs: usize) -> Result<Self> {
        let name = format!("f{len}q{pairs}");
        let mut spec = d.spec(&name, &format!("bxb-{name}"));
        spec.queue_pairs = pairs;
        d.add(spec)?;
        let fe = Frontend::connect(
            &d.dir.join(format!("{name}.sock")),
            Options {
                pairs,
                ..Options::default()
            },
        )?;
        let tap = TapLink::open(&format!("bxb-{name}p"))?;
        Ok(Self {
            name,
            fe,
            tap,
            frame: frame(len),
        })
    }

    /// Frames per second through our backend: what it passed to the TAP, counted by
    /// the backend once it drained the rings.
    fn ours(&mut self, d: &NetDaemon, secs: f64, tally: &mut Tally) -> Result<f64> {
        let before = d.stats(&self.name)?;
        let t = Instant::now();
        let sent = flood(
            &mut RoundRobin {
                fe: &mut self.fe,
                next: 0,
            },
            &self.frame,
            secs,
        )?;
        let took = t.elapsed().as_secs_f64();
        // Drained when the count stops moving (bounded).
        let mut last = d.stats(&self.name)?.tx_packets;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(20));
            let now = d.stats(&self.name)?.tx_packets;
            if now == last {
                break;
            }
            last = now;
        }
        let after = d.stats(&self.name)?;
        let passed = after.tx_packets - before.tx_packets;
        tally.sent += sent;
        tally.lost += (losses(&after) - losses(&before)) + sent.saturating_sub(passed);
        Ok(passed as f64 / took)
    }

    /// The same frames written straight into the TAP by one thread.
    fn peer(&mut self, secs: f64) -> Result<f64> {
        let t = Instant::now();
        let n = flood(&mut self.tap, &self.frame, secs)?;
        Ok(n as f64 / t.elapsed().as_secs_f64())
    }
}

/// A namespace with a TAP as the host's 10.0.0.1 end.
fn host_ns(name: &str, tap: &str) -> Result<(Netns, [u8; 6])> {
    wait_link(tap)?;
    let mac = std::fs::read_to_string(format!("/sys/class/net/{tap}/address"))?;
    let mac = boxd_vhost_net::control::parse_mac(mac.trim()).context("TAP MAC")?;
    let ns = Netns::new(name)?;
    ns.adopt(tap, "10.0.0.1/30")?;
    Ok((ns, mac))
}

/// Bits per second of a TCP stream from the guest side of `link` to the host in `ns`.
fn tso_stream(ns: &Netns, link: &mut dyn Link, host_mac: [u8; 6], bytes: usize) -> Result<f64> {
    let server = ns.run(|| {
        let l = std::net::TcpListener::bind("10.0.0.1:7000")?;
        let (mut s, _) = l.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut n, t) = (0usize, Instant::now());
        loop {
            match s.read(&mut buf)? {
                0 => break,
                k => n += k,
            }
        }
        Ok((n, t.elapsed()))
    });
    std::thread::sleep(Duration::from_millis(100));
    let pattern: Vec<u8> = (0..4u32 << 20).map(|i| (i * 31) as u8).collect();
    let mut tcp = GuestTcp {
        link,
        host_mac,
        deadline: Instant::now() + Duration::from_secs(120),
        gso_frames: 0,
        largest: 0,
    };
    tcp.send_repeated(40000, 7000, &pattern, bytes, 60000)?;
    let (n, took) = server.join().expect("server thread")?;
    if n != bytes {
        bail!("the host received {n} of {bytes} bytes");
    }
    Ok(n as f64 * 8.0 / took.as_secs_f64())
}

/// Bits per second of a TCP stream from the host in `ns` to the guest side of `link`
/// (the host's TSO reaching the guest as 64 KiB frames over mergeable buffers).
fn tso_stream_rx(ns: &Netns, link: &mut dyn Link, host_mac: [u8; 6], bytes: usize) -> Result<f64> {
    let client = ns.run(move || {
        let mut s = std::net::TcpStream::connect_timeout(
            &"10.0.0.2:8000".parse()?,
            Duration::from_secs(10),
        )?;
        let chunk = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            std::io::Write::write_all(&mut s, &chunk[..n])?;
            left -= n;
        }
        Ok(())
    });
    let mut tcp = GuestTcp {
        link,
        host_mac,
        deadline: Instant::now() + Duration::from_secs(120),
        gso_frames: 0,
        largest: 0,
    };
    let t = Instant::now();
    let n = tcp.accept_stream_len(8000, bytes)?;
    let took = t.elapsed();
    client.join().expect("client thread")?;
    if n != bytes {
        bail!("the guest received {n} of {bytes} bytes");
    }
    Ok(n as f64 * 8.0 / took.as_secs_f64())
}

/// UDP round-trip times (µs, sorted) between the guest side of `link` and an echo
/// server on the host in `ns`.
fn round_trips(ns: &Netns, link: &mut dyn Link, host_mac: [u8; 6], n: usize) -> Result<Vec<f64>> {
    let echo = ns.run(move || {
        let s = std::net::UdpSocket::bind("10.0.0.1:7777")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 2048];
        for _ in 0..n + 200 {
            let (k, from) = s.recv_from(&mut buf)?;
            s.send_to(&buf[..k], from)?;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n + 200 {
        let payload = (i as u64).to_be_bytes();
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&pkt::udp_frame(
            GUEST_MAC,
            host_mac,
            (GUEST_IP, 5555),
            (HOST_IP, 7777),
            &payload,
        ));
        let t = Instant::now();
        link.send(&f)?;
        loop {
            let Some(r) = link.recv(Duration::from_secs(2))? else {
                bail!("no echo for round trip {i}");
            };
            if let Some((mac, ip)) = pkt::arp_request_for_guest(&r) {
                link.send(&pkt::arp_reply(mac, ip))?;
                continue;
            }
            if r.len() >= VNET_HDR_LEN + 42 + 8
                && r[VNET_HDR_LEN + 42..VNET_HDR_LEN + 50] == payload
            {
                break;
            }
        }
        if i >= 200 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    echo.join().expect("echo thread")?;
    rtts.sort_by(f64::total_cmp);
    Ok(rtts)
}

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// iperf3 from a QEMU guest to the host in `ns`; bits per second the host received.
fn guest_tcp(ns: &Netns, net: GuestNet, dir: &std::path::Path, secs: u32) -> Result<f64> {
    let server = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "iperf3", "-s", "-1", "-J", "-B", "10.0.0.1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("iperf3 (cargo xtask setup installs it)")?;
    let script = format!(
        "ip link set eth0 up; ip addr add 10.0.0.2/30 dev eth0; \
         ping -c 1 -w 60 10.0.0.1 >/dev/null && iperf3 -c 10.0.0.1 -t {secs}"
    );
    let vm = Qemu::run(dir, net, 2, &script, Duration::from_secs(300))?;
    let out = server.wait_with_output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 server output; guest console:\n{}",
            vm.console_tail(2000)
        )
    })?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no result from iperf3: {v}"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    bench::check_args(
        &args,
        &["--seconds", "--rounds", "--stream-mib"],
        &["--skip-guest"],
    )?;
    let secs: f64 = bench::arg(&args, "--seconds", 2.0)?;
    let rounds: usize = bench::arg(&args, "--rounds", bench::ROUNDS_MIN)?;
    let stream_mib: usize = bench::arg(&args, "--stream-mib", 256)?;
    let skip_guest = args.iter().any(|a| a == "--skip-guest");
    bench::check_rounds(rounds)?;
    let d = NetDaemon::start("bench")?;
    println!(
        "the network backend (boxd net serve) against the same frames written straight into a TAP (no vrings):"
    );

    let gbps = |pps: f64| pps * 1500.0 * 8.0 / 1e9;
    let mpps = |pps: f64| pps / 1e6;
    let mut tally = Tally::default();
    for (name, len, pairs, unit, conv) in [
        ("net-64b-mpps", 64, 1, "Mpps", &mpps as &dyn Fn(f64) -> f64),
        ("net-64b-mq2-mpps", 64, 2, "Mpps", &mpps),
        ("net-1500b-gbps", 1500, 1, "Gbit/s", &gbps),
    ] {
        let mut port = FramePort::new(&d, len, pairs)?;
        let (o, p) = bench::interleave(name, rounds, |side| {
            Ok(conv(match side {
                Side::Ours => port.ours(&d, secs, &mut tally)?,
                Side::Peer => port.peer(secs)?,
            }))
        })?;
        bench::compare(name, unit, &o, &p, "tap", Better::Higher);
    }
    bench::check_errors("frames through the backend", tally.sent, tally.lost)?;

    // TSO streams and round trips, ours and the peer's, each in its own namespace.
    d.add(d.spec("tso", "bxb-tso"))?;
    let (ns, mac) = host_ns("bxb-tso", "bxb-tso")?;
    let mut fe = Frontend::connect(&d.dir.join("tso.sock"), Options::default())?;
    let mut tap = TapLink::open("bxb-tsop")?;
    let (pns, pmac) = host_ns("bxb-tsop", "bxb-tsop")?;
    let bytes = stream_mib << 20;
    for (name, rx) in [("net-tso-gbps", false), ("net-tso-rx-gbps", true)] {
        let (o, p) = bench::interleave(name, rounds, |side| {
            let mut link = FrontendLink {
                fe: &mut fe,
                pair: 0,
            };
            let (ns, link, mac): (&Netns, &mut dyn Link, _) = match side {
                Side::Ours => (&ns, &mut link, mac),
                Side::Peer => (&pns, &mut tap, pmac),
            };
            let bps = if rx {
                tso_stream_rx(ns, link, mac, bytes)?
            } else {
                tso_stream(ns, link, mac, bytes)?
            };
            Ok(bps / 1e9)
        })?;
        bench::compare(name, "Gbit/s", &o, &p, "tap", Better::Higher);
    }
    const TRIPS: usize = 2000;
    let (mut rtts_o, mut rtts_p) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let mut link = FrontendLink {
            fe: &mut fe,
            pair: 0,
        };
        rtts_o.push(round_trips(&ns, &mut link, mac, TRIPS)?);
        rtts_p.push(round_trips(&pns, &mut tap, pmac, TRIPS)?);
    }
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let o: Vec<f64> = rtts_o.iter().map(|r| pct(r, p)).collect();
        let q: Vec<f64> = rtts_p.iter().map(|r| pct(r, p)).collect();
        bench::compare(
            &format!("net-rtt-{name}-us"),
            "us",
            &o,
            &q,
            "tap",
            Better::Lower,
        );
        let added: Vec<f64> = o
            .iter()
            .zip(&q)
            .map(|(o, q)| ((o - q) / 2.0).max(0.0))
            .collect();
        bench::alone(
            &format!("net-added-latency-{name}-us"),
            "us",
            &added,
            "half the round trip over the direct TAP's",
        );
    }
    drop(fe);
    drop((ns, pns, tap));

    let mut settings = vec![
        ("rounds", rounds.to_string()),
        ("seconds", secs.to_string()),
        ("frame_bytes", "64,1500".into()),
        ("stream_mib", stream_mib.to_string()),
        ("tso_segment_bytes", "60000".into()),
        ("round_trips", TRIPS.to_string()),
    ];
    if skip_guest {
        println!("# --skip-guest: no QEMU guest run");
        settings.push(("guest", "skipped".into()));
        bench::settings("net", &settings);
        return Ok(());
    }
    // Guest TCP: the same Debian guest on QEMU, through our backend, then through
    // QEMU's own TAP backend (QEMU runs inside the namespace to open it there).
    d.add(d.spec("guest", "bxb-guest"))?;
    let (gns, _) = host_ns("bxb-guest", "bxb-guest")?;
    let qns = Netns::new("bxb-qtap")?;
    qns.ip(&[
        "tuntap", "add", "dev", "bxb-qtap", "mode", "tap", "vnet_hdr",
    ])?;
    qns.ip(&["addr", "add", "10.0.0.1/30", "dev", "bxb-qtap"])?;
    qns.ip(&["link", "set", "bxb-qtap", "up"])?;
    const GUEST_SECONDS: u32 = 10;
    let mut round = 0;
    let (o, p) = bench::interleave("net-guest-tcp", rounds, |side| {
        round += 1;
        let bps = match side {
            Side::Ours => guest_tcp(
                &gns,
                GuestNet::VhostUser(&d.dir.join("guest.sock"), 1),
                &d.dir.join(format!("g1-{round}")),
                GUEST_SECONDS,
            )?,
            Side::Peer => guest_tcp(
                &qns,
                GuestNet::TapIn {
                    tap: "bxb-qtap",
                    netns: &qns.name,
                },
                &d.dir.join(format!("g2-{round}")),
                GUEST_SECONDS,
            )?,
        };
        Ok(bps / 1e6)
    })?;
    println!("guest TCP (iperf3 from a Debian guest on QEMU's software CPU to the host):");
    bench::compare(
        "net-guest-tcp",
        "Mbit/s",
        &o,
        &p,
        "qemu-tap",
        Better::Higher,
    );
    settings.push(("guest_iperf_seconds", GUEST_SECONDS.to_string()));
    bench::settings("net", &settings);
    Ok(())
}
