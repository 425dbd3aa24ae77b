//! Fixture tests of every eBPF program through BPF_PROG_TEST_RUN: a synthetic packet
//! in, the verdict and the output bytes checked against an expected packet built with
//! the rewritten fields (Katran's and Cilium's way). The maps are the real pinned maps,
//! programmed by the real `boxd bpf apply` in a private network namespace. Needs root.

use anyhow::{Context, Result, ensure};
use aya::Ebpf;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use boxd_datapath::{PinDir, common::progs, events, load, tables};
use boxd_tests::bpf::{Datapath, mac, run_ok, tools_missing, veth};
use boxd_tests::net::Netns;
use boxd_tests::pkt::Ip4;
use boxd_tests::tls::{self, Client};
use serde_json::json;
use std::time::Duration;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: [u8; 4] = [198, 51, 100, 2];
const PUBLIC: [u8; 4] = [203, 0, 113, 7];
const SLEEPY: [u8; 4] = [203, 0, 113, 8];
const REMOTE: [u8; 4] = [203, 0, 113, 9];
const LIMITED: [u8; 4] = [203, 0, 113, 10];
const LINK: [u8; 4] = [10, 0, 0, 2];
const PROXY: [u8; 4] = [198, 51, 100, 10];
const NODE1: [u8; 4] = [10, 1, 0, 1];
const NODE2: [u8; 4] = [10, 1, 0, 2];
const NODE2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x33];
const VM_MAC: [u8; 6] = [0x06, 0xb0, 0xc5, 0, 0, 0x02];

/// A namespace with an uplink, two VM ports and a private link to node 2, the data
/// path up and programmed.
struct Fx {
    ns: Netns,
    dp: Datapath,
    /// The other ends of the veths (deleting it would delete them all).
    _peer: Netns,
}

fn parse_mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in s.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).expect("mac");
    }
    m
}

/// What these tests need, when something of it is missing.
fn missing() -> Option<String> {
    if !boxd_tests::is_root() {
        return Some("network namespaces and BPF need root".into());
    }
    tools_missing()
}

fn fx(tag: &str) -> Result<Fx> {
    let id = format!("{}{tag}", std::process::id() % 100_000);
    let ns = Netns::new(&format!("bxf{id}"))?;
    let peer = Netns::new(&format!("bxg{id}"))?;
    for (a, b) in [
        ("up0", "c0"),
        ("tap0", "vm0"),
        ("tap1", "vm1"),
        ("tap2", "vm2"),
        ("pr0", "pr1"),
    ] {
        veth(&ns.name, a, &peer.name, b)?;
    }
    ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"])?;
    ns.ip(&["addr", "add", "10.1.0.1/24", "dev", "pr0"])?;
    let nm = |m: [u8; 6]| m.map(|b| format!("{b:02x}")).join(":");
    ns.ip(&[
        "neigh",
        "add",
        "10.1.0.2",
        "lladdr",
        &nm(NODE2_MAC),
        "dev",
        "pr0",
        "nud",
        "permanent",
    ])?;
    ns.ip(&[
        "neigh",
        "add",
        "198.51.100.2",
        "lladdr",
        &nm(CLIENT_MAC),
        "dev",
        "up0",
        "nud",
        "permanent",
    ])?;
    let dp = Datapath::up(
        &ns.name,
        &id,
        &[
            "--uplink",
            "up0",
            "--private",
            "pr0",
            "--node-addr",
            "10.1.0.1",
        ],
    )?;
    dp.apply(&json!({
        "nodes": [{"id": 2, "addr": "10.1.0.2"}],
        "vms": [
            {"id": 7, "public": "203.0.113.7", "state": "running", "port": "tap0"},
            {"id": 8, "public": "203.0.113.8", "state": "suspended", "port": "tap1"},
            {"id": 9, "public": "203.0.113.9", "node": 2, "state": "running"},
            {"id": 10, "public": "203.0.113.10", "state": "running", "port": "tap2", "rate_bytes_per_s": 1000, "burst_bytes": 1514},
        ],
        "domains": [
            {"name": "my-app.boxd.example", "public": "203.0.113.7"},
            {"name": "sleepy.boxd.example", "public": "203.0.113.8"},
        ],
        "proxies": ["198.51.100.10"],
    }))?;
    Ok(Fx {
        ns,
        dp,
        _peer: peer,
    })
}

impl Fx {
    /// Runs `f` on a thread inside the namespace with the object loaded over the pinned
    /// maps (program instances of our own, the maps shared with the attached ones).
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Ebpf, &PinDir) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let pin = PinDir(self.dp.pin.clone());
        self.ns
            .run(move || {
                let mut ebpf = load(&pin)?;
                f(&mut ebpf, &pin)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("fixture thread panicked"))?
    }

    fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        Ok(parse_mac(&mac(&self.ns.name, dev)?))
    }
}

fn xdp(ebpf: &mut Ebpf, prog: &str, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    let p: &mut Xdp = ebpf.program_mut(prog).context("program")?.try_into()?;
    let mut out = vec![0u8; input.len() + 256];
    let r = p.test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

fn tc(ebpf: &mut Ebpf, ifindex: u32, input: &[u8]) -> Result<(u32, Vec<u8>)> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(progs::VM_EGRESS)
        .context("program")?
        .try_into()?;
    let mut out = vec![0u8; input.len() + 256];
    // A whole struct __sk_buff (192 bytes) with only `ifindex` (offset 40) set: the
    // device the packet comes in on, as on a VM's host port. (A shorter context without
    // a context out buffer is refused with EINVAL.)
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut ctx_out = [0u8; 192];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ctx_out: Some(&mut ctx_out),
            ..Default::default()
        })
        .map_err(|e| anyhow::anyhow!("test_run: {e} ({:?})", std::error::Error::source(&e)))?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

fn ifindex_in(ns: &str, dev: &str) -> Result<u32> {
    let out = run_ok({
        let mut c = std::process::Command::new("ip");
        c.args(["-n", ns, "-o", "link", "show", "dev", dev]);
        c
    })?;
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split(':').next().context("ifindex")?.trim().parse()?)
}

/// The router's view of a packet for a local VM: DNAT to the link address, TTL - 1,
/// MACs of the VM and its port.
fn dnat(mut p: Ip4, port_mac: [u8; 6]) -> Ip4 {
    p.dst = LINK;
    p.ttl -= 1;
    p.dst_mac = VM_MAC;
    p.src_mac = port_mac;
    p
}

#[test]
fn router_fixtures() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let f = fx("r")?;
    let tap0 = f.mac("tap0")?;
    let tap1 = f.mac("tap1")?;
    let up0 = f.mac("up0")?;
    let pr0 = f.mac("pr0")?;
    let stats = f.run(move |e, pin| {
        let case = |e: &mut Ebpf,
                    what: &str,
                    input: Vec<u8>,
                    verdict: u32,
                    want: Option<Vec<u8>>|
         -> Result<()> {
            let (v, out) = xdp(e, progs::ROUTER, &input)?;
            ensure!(v == verdict, "{what}: verdict {v}, expected {verdict}");
            if verdict == XDP_DROP {
                // What a dropped packet looked like when dropped does not matter.
                return Ok(());
            }
            let want = want.unwrap_or(input);
            ensure!(
                out == want,
                "{what}: output differs\n got  {out:02x?}\n want {want:02x?}"
            );
            Ok(())
        };
        let udp = Ip4::udp((CLIENT, 40000), (PUBLIC, 53), b"hello, vm");
        case(
            e,
            "UDP to a public address",
            udp.frame(),
            XDP_REDIRECT,
            Some(dnat(udp.clone(), tap0).frame()),
        )?;
        let syn = Ip4::tcp((CLIENT, 40001), (PUBLIC, 22), 7, 0x02, b"");
        case(
            e,
            "TCP SYN",
            syn.frame(),
            XDP_REDIRECT,
            Some(dnat(syn.clone(), tap0).frame()),
        )?;
        let data = Ip4::tcp((CLIENT, 40001), (PUBLIC, 22), 8, 0x18, &[0xab; 1400]);
        case(
            e,
            "TCP data",
            data.frame(),
            XDP_REDIRECT,
            Some(dnat(data.clone(), tap0).frame()),
        )?;
        let echo = Ip4::icmp_echo(CLIENT, PUBLIC, b"ping");
        case(
            e,
            "ICMP echo",
            echo.frame(),
            XDP_REDIRECT,
            Some(dnat(echo.clone(), tap0).frame()),
        )?;
        let mut opts = Ip4::udp((CLIENT, 40002), (PUBLIC, 53), b"with options");
        opts.options = vec![1, 1, 1, 0];
        case(
            e,
            "IP options",
            opts.frame(),
            XDP_REDIRECT,
            Some(dnat(opts.clone(), tap0).frame()),
        )?;
        // Fragments: the transport checksum (in the first) covers the new address; the
        // others change in the IP header only.
        let mut big = Ip4::udp((CLIENT, 40003), (PUBLIC, 5000), &[0x5a; 3000]);
        big.frag = 0;
        let (frags, wants) = (big.fragments(1480), dnat(big.clone(), tap0).fragments(1480));
        ensure!(frags.len() == 3);
        for (i, (fr, w)) in frags.into_iter().zip(wants).enumerate() {
            case(e, &format!("fragment {i}"), fr, XDP_REDIRECT, Some(w))?;
        }
        let mut ttl1 = udp.clone();
        ttl1.ttl = 1;
        case(
            e,
            "TTL 1 (the kernel answers time exceeded)",
            ttl1.frame(),
            XDP_PASS,
            None,
        )?;
        let unknown = Ip4::udp((CLIENT, 40000), ([203, 0, 113, 99], 53), b"x");
        case(e, "unknown destination", unknown.frame(), XDP_PASS, None)?;
        case(e, "IPv6", ipv6_frame(CLIENT_MAC), XDP_PASS, None)?;
        let full = udp.frame();
        case(
            e,
            "truncated IP header",
            full[..14 + 12].to_vec(),
            XDP_PASS,
            None,
        )?;
        case(e, "Ethernet only", full[..14].to_vec(), XDP_PASS, None)?;
        let mut long = udp.frame();
        long[16..18].copy_from_slice(&1000u16.to_be_bytes());
        case(e, "total length past the packet", long, XDP_DROP, None)?;
        let mut short = udp.frame();
        short[16..18].copy_from_slice(&12u16.to_be_bytes());
        case(
            e,
            "total length shorter than the header",
            short,
            XDP_DROP,
            None,
        )?;
        let mut ihl = udp.frame();
        ihl[14] = 0x44;
        case(e, "header length 16", ihl, XDP_DROP, None)?;
        let mut cut = Ip4::tcp((CLIENT, 1), (PUBLIC, 22), 1, 0x02, b"").frame();
        cut.truncate(14 + 20 + 10);
        cut[16..18].copy_from_slice(&30u16.to_be_bytes());
        case(e, "TCP header cut short", cut, XDP_DROP, None)?;

        // ARP for a public address: answered from the uplink's MAC.
        let req = arp(1, CLIENT_MAC, CLIENT, [0; 6], PUBLIC, [0xff; 6]);
        let reply = arp(2, up0, PUBLIC, CLIENT_MAC, CLIENT, CLIENT_MAC);
        case(
            e,
            "ARP request for a public address",
            req,
            XDP_TX,
            Some(reply),
        )?;
        case(
            e,
            "ARP request for another address",
            arp(1, CLIENT_MAC, CLIENT, [0; 6], [198, 51, 100, 1], [0xff; 6]),
            XDP_PASS,
            None,
        )?;
        case(
            e,
            "ARP reply",
            arp(2, CLIENT_MAC, CLIENT, up0, PUBLIC, up0),
            XDP_PASS,
            None,
        )?;

        // A suspended VM: delivered to its port (which holds it) and one wake event.
        let sub = events::subscribe(pin)?;
        let wake = Ip4::udp((CLIENT, 40004), (SLEEPY, 80), b"wake up");
        case(
            e,
            "packet for a suspended VM",
            wake.frame(),
            XDP_REDIRECT,
            Some(dnat(wake.clone(), tap1).frame()),
        )?;
        case(
            e,
            "second packet for it",
            wake.frame(),
            XDP_REDIRECT,
            Some(dnat(wake.clone(), tap1).frame()),
        )?;
        let ev = sub
            .recv_timeout(Duration::from_secs(2))
            .context("no wake event")?;
        ensure!(
            ev.public.octets() == SLEEPY
                && ev.vm_id == 8
                && ev.reason == "packet"
                && ev.state == "suspended",
            "{ev:?}"
        );
        ensure!(
            sub.recv_timeout(Duration::from_millis(300)).is_none(),
            "a second wake event within the interval"
        );
        drop(sub);

        // A VM on node 2: IPIP from this node's private address, out of pr0 to node 2.
        let far = Ip4::tcp((CLIENT, 40005), (REMOTE, 443), 1, 0x02, b"");
        let inner = far.frame();
        let mut outer = Ip4::new(NODE1, NODE2, 4, inner[14..].to_vec());
        outer.ttl = 64;
        outer.id = 0;
        outer.frag = 0;
        outer.dst_mac = NODE2_MAC;
        outer.src_mac = pr0;
        case(
            e,
            "VM on another node",
            inner,
            XDP_REDIRECT,
            Some(outer.frame()),
        )?;
        // And the other way: IPIP for this node, decapsulated and delivered.
        let mut enc = Ip4::new(NODE2, NODE1, 4, udp.frame()[14..].to_vec());
        enc.frag = 0;
        case(
            e,
            "IPIP for a local VM",
            enc.frame(),
            XDP_REDIRECT,
            Some(dnat(udp.clone(), tap0).frame()),
        )?;
        let mut enc_unknown = Ip4::new(NODE2, NODE1, 4, unknown.frame()[14..].to_vec());
        enc_unknown.frag = 0;
        case(
            e,
            "IPIP with an unknown inner destination",
            enc_unknown.frame(),
            XDP_DROP,
            None,
        )?;

        // TLS to the proxy address goes through the SNI parser (tail call) and on to
        // the kernel.
        let hello = synthetic_hello("my-app.boxd.example");
        let seg = Ip4::tcp((CLIENT, 40006), (PROXY, 443), 1000, 0x18, &hello);
        case(e, "ClientHello to the proxy", seg.frame(), XDP_PASS, None)?;
        let steer = tables::steer(
            pin,
            "198.51.100.2:40006".parse()?,
            "198.51.100.10:443".parse()?,
        )?
        .context("the router's tail call did not record a steering decision")?;
        ensure!(steer.vm_id == 7);
        Ok(tables::stats(pin)?)
    })?;
    assert_eq!(stats["bad-header"], 4, "{stats:?}");
    assert!(stats["ttl-exceeded"] >= 1);
    assert_eq!(stats["arp-replies"], 1);
    assert_eq!(stats["wake-sent"], 1);
    assert!(stats["router-encap"] >= 1 && stats["router-decap"] >= 2);
    Ok(())
}

/// A minimal IPv6/UDP frame (the VM link carries IPv4 only).
fn ipv6_frame(src_mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
    f.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0, 9, 0, 9, 0, 8, 0, 0]);
    f
}

fn arp(
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
    eth_dst: [u8; 6],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f
}

#[test]
fn vm_side_fixtures() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let f = fx("v")?;
    let tap0 = ifindex_in(&f.ns.name, "tap0")?;
    let tap2 = ifindex_in(&f.ns.name, "tap2")?;
    let tap0_mac = f.mac("tap0")?;
    let up0 = f.mac("up0")?;
    let stats = f.run(move |e, pin| {
        let case = |e: &mut Ebpf,
                    port: u32,
                    what: &str,
                    input: Vec<u8>,
                    verdict: u32,
                    want: Option<Vec<u8>>|
         -> Result<()> {
            let (v, out) = tc(e, port, &input).with_context(|| what.to_string())?;
            ensure!(v == verdict, "{what}: verdict {v}, expected {verdict}");
            let want = want.unwrap_or(input);
            ensure!(
                out == want,
                "{what}: output differs\n got  {out:02x?}\n want {want:02x?}"
            );
            Ok(())
        };
        // From the VM (link address) to the client: SNAT to the public address, MACs
        // of the uplink's neighbour, redirected out of the uplink.
        let snat = |mut p: Ip4| {
            p.src = PUBLIC;
            p.src_mac = up0;
            p.dst_mac = CLIENT_MAC;
            p
        };
        let mut udp = Ip4::udp((LINK, 53), (CLIENT, 40000), b"answer");
        udp.src_mac = VM_MAC;
        udp.dst_mac = tap0_mac;
        case(
            e,
            tap0,
            "UDP from the VM",
            udp.frame(),
            TC_ACT_REDIRECT,
            Some(snat(udp.clone()).frame()),
        )?;
        let mut tcp = Ip4::tcp((LINK, 22), (CLIENT, 40001), 9, 0x12, b"");
        tcp.src_mac = VM_MAC;
        tcp.dst_mac = tap0_mac;
        case(
            e,
            tap0,
            "TCP SYN-ACK from the VM",
            tcp.frame(),
            TC_ACT_REDIRECT,
            Some(snat(tcp.clone()).frame()),
        )?;
        let mut echo = Ip4::icmp_echo(LINK, CLIENT, b"pong");
        echo.src_mac = VM_MAC;
        echo.dst_mac = tap0_mac;
        case(
            e,
            tap0,
            "ICMP from the VM",
            echo.frame(),
            TC_ACT_REDIRECT,
            Some(snat(echo.clone()).frame()),
        )?;
        // No route to the destination here: SNATed, then left to the kernel.
        let mut far = Ip4::udp((LINK, 53), ([192, 0, 2, 1], 53), b"q");
        far.src_mac = VM_MAC;
        far.dst_mac = tap0_mac;
        let mut far_want = far.clone();
        far_want.src = PUBLIC;
        case(
            e,
            tap0,
            "no route",
            far.frame(),
            TC_ACT_OK,
            Some(far_want.frame()),
        )?;
        let mut spoof = udp.clone();
        spoof.src = [10, 0, 0, 5];
        case(e, tap0, "spoofed source", spoof.frame(), TC_ACT_SHOT, None)?;
        let mut gw = Ip4::udp((LINK, 5000), ([10, 0, 0, 1], 80), b"metadata");
        gw.src_mac = VM_MAC;
        case(
            e,
            tap0,
            "to the host's link address",
            gw.frame(),
            TC_ACT_OK,
            None,
        )?;
        case(
            e,
            tap0,
            "ARP",
            arp(1, VM_MAC, LINK, [0; 6], [10, 0, 0, 1], [0xff; 6]),
            TC_ACT_OK,
            None,
        )?;
        case(e, tap0, "IPv6", ipv6_frame(VM_MAC), TC_ACT_SHOT, None)?;
        // Rate limit: 1000 B/s with a 1514-byte bucket; the first frame fits, the next
        // two do not.
        let mut limited = Ip4::udp((LINK, 9), (CLIENT, 9), &[0u8; 958]);
        limited.src_mac = VM_MAC;
        let mut lw = limited.clone();
        lw.src = LIMITED;
        lw.src_mac = up0;
        lw.dst_mac = CLIENT_MAC;
        case(
            e,
            tap2,
            "within the rate",
            limited.frame(),
            TC_ACT_REDIRECT,
            Some(lw.frame()),
        )?;
        case(e, tap2, "over the rate", limited.frame(), TC_ACT_SHOT, None)?;
        case(
            e,
            tap2,
            "still over the rate",
            limited.frame(),
            TC_ACT_SHOT,
            None,
        )?;
        let vms = tables::vms(pin)?;
        let limited_vm = vms
            .iter()
            .find(|v| v.public.octets() == LIMITED)
            .context("VM .10")?;
        ensure!(limited_vm.counters.rate_dropped == 2, "{limited_vm:?}");
        let vm7 = vms
            .iter()
            .find(|v| v.public.octets() == PUBLIC)
            .context("VM .7")?;
        ensure!(
            vm7.counters.spoofed == 1 && vm7.counters.tx_packets == 4,
            "{vm7:?}"
        );
        Ok(tables::stats(pin)?)
    })?;
    assert_eq!(stats["vm-spoofed"], 1);
    assert_eq!(stats["vm-rate-dropped"], 2);
    assert_eq!(stats["vm-to-host"], 1);
    // The veth peers also send IPv6 router solicitations through the attached program.
    assert!(stats["vm-ethertype"] >= 1);
    Ok(())
}

/// A ClientHello as a TLS 1.3 client sends it, with `name` after a 1.2 KB key share
/// (like a browser's post-quantum one).
fn synthetic_hello(name: &str) -> Vec<u8> {
    let mut exts = Vec::new();
    // key_share (51) with 1216 bytes of key.
    exts.extend_from_slice(&51u16.to_be_bytes());
    exts.extend_from_slice(&1222u16.to_be_bytes());
    exts.extend_from_slice(&1220u16.to_be_bytes());
    exts.extend_from_slice(&0x11ecu16.to_be_bytes());
    exts.extend_from_slice(&1216u16.to_be_bytes());
    exts.extend_from_slice(&[0x42; 1216]);
    exts.extend_from_slice(&0u16.to_be_bytes());
    exts.extend_from_slice(&((name.len() + 5) as u16).to_be_bytes());
    exts.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    exts.push(0);
    exts.extend_from_slice(&(name.len() as u16).to_be_bytes());
    exts.extend_from_slice(name.as_bytes());
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]);
    body.push(32);
    body.extend_from_slice(&[0x22; 32]);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// Chromium ClientHellos captured with `cargo xtask capture-hellos` (each about 2 KB,
/// with a post-quantum key share and a random extension order).
fn chromium_hellos() -> Vec<(String, Vec<u8>)> {
    let dir = boxd_tests::root().join("tests/fixtures/tls");
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("chromium") && name.ends_with(".bin") {
                out.push((name, std::fs::read(e.path()).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn sni_fixtures_with_real_client_hellos() -> Result<()> {
    if let Some(why) = missing() {
        boxd_tests::skip!("{why}");
    }
    let f = fx("t")?;
    // Real clients, captured now on loopback.
    let mut hellos: Vec<(String, Vec<u8>)> = Vec::new();
    for c in [Client::Curl, Client::OpenSsl, Client::Python] {
        if !c.available() {
            boxd_tests::skip!(
                "{} is not installed (`cargo xtask setup` installs it): its ClientHello is one of the fixtures",
                c.name()
            );
        }
        hellos.push((c.name().into(), tls::capture(c, "my-app.boxd.example")?));
    }
    let chromium = chromium_hellos();
    ensure!(
        chromium.len() >= 2,
        "the committed Chromium ClientHellos are missing (tests/fixtures/tls)"
    );
    hellos.extend(chromium.iter().cloned());
    hellos.push((
        "synthetic 2 KB".into(),
        synthetic_hello("my-app.boxd.example"),
    ));

    f.run(move |e, pin| {
        let mut port = 41000u16;
        let seg = |e: &mut Ebpf, port: u16, seq: u32, payload: &[u8]| -> Result<u32> {
            let p = Ip4::tcp((CLIENT, port), (PROXY, 443), seq, 0x18, payload);
            Ok(xdp(e, progs::SNI, &p.frame())?.0)
        };
        let steer = |pin: &PinDir, port: u16| {
            tables::steer(
                pin,
                format!("198.51.100.2:{port}").parse().unwrap(),
                "198.51.100.10:443".parse().unwrap(),
            )
        };
        for (who, hello) in &hellos {
            let (name_at, name_len) =
                tls::sni_position(hello).with_context(|| format!("{who}: no server_name"))?;
            let name = String::from_utf8_lossy(&hello[name_at..name_at + name_len]).to_string();
            let want_vm = if name.starts_with("sleepy") { 8 } else { 7 };
            // Whole, in one segment.
            port += 1;
            ensure!(
                seg(e, port, 1, hello)? == XDP_PASS,
                "{who}: the parser must never drop"
            );
            let s = steer(pin, port)?
                .with_context(|| format!("{who}: name {name} not found in one segment"))?;
            ensure!(s.vm_id == want_vm && s.segment == 1, "{who}: {s:?}");
            // Cut where a 1500-byte link cuts it, and at the name from both sides.
            let mut cuts = vec![name_at - 1, name_at + name_len / 2, name_at + name_len + 1];
            if hello.len() > 1448 {
                cuts.push(1448);
            }
            for cut in cuts.into_iter().filter(|&c| c > 0 && c < hello.len()) {
                port += 1;
                seg(e, port, 1, &hello[..cut])?;
                seg(e, port, 1 + cut as u32, &hello[cut..])?;
                let s = steer(pin, port)?.with_context(|| {
                    format!(
                        "{who}: name not found when cut at {cut} (name at {name_at}..{})",
                        name_at + name_len
                    )
                })?;
                let want_seg = if cut >= name_at + name_len { 1 } else { 2 };
                ensure!(
                    s.vm_id == want_vm && s.segment == want_seg,
                    "{who} cut at {cut}: {s:?}"
                );
            }
            // The second segment out of order (a retransmission of the first, or a gap):
            // no decision, the proxy reads the name itself.
            port += 1;
            let cut = name_at - 1;
            seg(e, port, 1, &hello[..cut])?;
            seg(e, port, 5 + cut as u32, &hello[cut..])?;
            ensure!(
                steer(pin, port)?.is_none(),
                "{who}: decided on an out-of-order segment"
            );
        }
        // Malformed and odd input: never dropped, never a decision.
        let good = synthetic_hello("my-app.boxd.example");
        let mut bad_len = good.clone();
        bad_len[3] = 0;
        bad_len[4] = 10;
        let odd: Vec<(&str, Vec<u8>)> = vec![
            (
                "not TLS",
                b"GET / HTTP/1.1\r\nHost: my-app.boxd.example\r\n\r\n".to_vec(),
            ),
            ("record header only", good[..5].to_vec()),
            ("record shorter than the handshake", bad_len),
            ("cut inside the fixed part", good[..40].to_vec()),
            (
                "a name too long for DNS",
                synthetic_hello(&format!("{}.example", "a".repeat(250))),
            ),
            ("unknown name", synthetic_hello("nobody.boxd.example")),
            ("garbage", (0..600u32).map(|i| (i * 37) as u8).collect()),
        ];
        for (what, payload) in odd {
            port += 1;
            ensure!(seg(e, port, 1, &payload)? == XDP_PASS, "{what}: dropped");
            ensure!(
                steer(pin, port)?.is_none(),
                "{what}: a decision was recorded"
            );
        }
        // A sleeping VM's domain wakes it, reason "sni".
        let sub = events::subscribe(pin)?;
        port += 1;
        seg(e, port, 1, &synthetic_hello("sleepy.boxd.example"))?;
        let ev = sub
            .recv_timeout(Duration::from_secs(2))
            .context("no wake event from SNI")?;
        ensure!(ev.vm_id == 8 && ev.reason == "sni", "{ev:?}");
        let stats = tables::stats(pin)?;
        ensure!(
            stats["sni-unknown-name"] >= 1
                && stats["sni-fallback"] >= 5
                && stats["sni-found-later-segment"] >= 1,
            "{stats:?}"
        );
        Ok(())
    })
}
