//! `cargo xtask bench bpf`: the data path's per-packet cost and its forwarding rate.
//!
//! - ns per packet for the router (DNAT to a local VM), the VM-side SNAT and the SNI
//!   parser (a real Chromium ClientHello), from BPF_PROG_RUN. The router and SNAT
//!   rewrite the packet they are given, and a repeated run would see its own output, so
//!   each of those is one run per call and the figure is the median of the kernel's
//!   per-run times minus the median of an empty XDP program timed the same way (the
//!   timer's own cost). The SNI parser leaves the packet alone: timed with a repeat count.
//! - packets per second through the router on veth: a live-frames BPF_PROG_RUN
//!   generator (XDP_TX out of the client's veth, batches of 64) against the router
//!   redirecting to the VM's veth; the peer is the kernel's own path on the same
//!   topology (IP forwarding with an nftables DNAT rule), fed by the same generator.

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp};
use boxd_datapath::{PinDir, common::progs, load};
use boxd_tests::bench::{self, Better};
use boxd_tests::bpf::{Datapath, in_ns, mac, run_ok, veth_queues};
use boxd_tests::net::Netns;
use boxd_tests::pkt::Ip4;
use serde_json::json;
use std::time::{Duration, Instant};

const CLIENT: [u8; 4] = [198, 51, 100, 2];
const PUBLIC: [u8; 4] = [203, 0, 113, 7];
const LINK: [u8; 4] = [10, 0, 0, 2];

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

/// A host between a client and a VM stand-in; `ours` runs the boxd router on the
/// uplink, otherwise the kernel forwards with an nftables DNAT rule.
struct Topo {
    client: Netns,
    host: Netns,
    vm: Netns,
    dp: Option<Datapath>,
}

/// What the host between the client and the VM stand-in does with the packets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// boxd's XDP router on the uplink.
    Ours,
    /// The kernel forwards, with an nftables DNAT rule.
    Kernel,
    /// The kernel takes them in and drops them (no forwarding): what the senders can
    /// offer when nothing has to be forwarded.
    Sink,
}

fn topo(tag: &str, mode: Mode) -> Result<Topo> {
    let id = format!("{}{tag}", std::process::id() % 100_000);
    let client = Netns::new(&format!("bbc{id}"))?;
    let host = Netns::new(&format!("bbh{id}"))?;
    let vm = Netns::new(&format!("bbv{id}"))?;
    // A queue per core on each link: the senders and the forwarding spread over them.
    let queues = std::thread::available_parallelism().map_or(1, |n| n.get());
    veth_queues(&client.name, "c0", &host.name, "up0", queues)?;
    veth_queues(&host.name, "tap0", &vm.name, "vm0", queues)?;
    client.ip(&["addr", "add", "198.51.100.2/24", "dev", "c0"])?;
    host.ip(&["addr", "add", "198.51.100.1/24", "dev", "up0"])?;
    host.ip(&["addr", "add", "10.0.0.1/30", "dev", "tap0"])?;
    vm.ip(&["addr", "add", "10.0.0.2/30", "dev", "vm0"])?;
    let vm_mac = mac(&vm.name, "vm0")?;
    host.ip(&[
        "neigh",
        "add",
        "10.0.0.2",
        "lladdr",
        &vm_mac,
        "dev",
        "tap0",
        "nud",
        "permanent",
    ])?;
    let client_mac = mac(&client.name, "c0")?;
    host.ip(&[
        "neigh",
        "add",
        "198.51.100.2",
        "lladdr",
        &client_mac,
        "dev",
        "up0",
        "nud",
        "permanent",
    ])?;
    let dp = if mode == Mode::Ours {
        let dp = Datapath::up(&host.name, &id, &["--uplink", "up0"])?;
        dp.apply(&json!({"vms": [{"id": 7, "public": "203.0.113.7", "state": "running", "port": "tap0", "vm_mac": vm_mac}]}))?;
        Some(dp)
    } else {
        // The kernel's path: forwarding and a DNAT rule; GRO on so the veths take
        // XDP-transmitted frames without an XDP program of ours.
        if mode == Mode::Kernel {
            run_ok(in_ns(
                &host.name,
                "sysctl",
                &["-qw", "net.ipv4.ip_forward=1"],
            ))?;
            run_ok(in_ns(
                &host.name,
                "nft",
                &[
                    "add table ip nat; add chain ip nat pre { type nat hook prerouting priority -100; }; add rule ip nat pre ip daddr 203.0.113.7 dnat to 10.0.0.2",
                ],
            ))?;
        }
        run_ok(in_ns(&host.name, "ethtool", &["-K", "up0", "gro", "on"]))?;
        None
    };
    run_ok(in_ns(&vm.name, "ethtool", &["-K", "vm0", "gro", "on"]))?;
    run_ok(in_ns(&client.name, "ethtool", &["-K", "c0", "gro", "on"]))?;
    // The VM stand-in drops what it gets cheaply: no ICMP storms back.
    run_ok(in_ns(
        &vm.name,
        "sysctl",
        &["-qw", "net.ipv4.icmp_ratelimit=1000000"],
    ))?;
    Ok(Topo {
        client,
        host,
        vm,
        dp,
    })
}

fn rx_packets(ns: &str, dev: &str) -> Result<u64> {
    // Not sysfs: it shows the namespace of whoever mounted it.
    let out = run_ok({
        let mut c = std::process::Command::new("ip");
        c.args(["-n", ns, "-s", "-j", "link", "show", "dev", dev]);
        c
    })?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("rx packets")
}

/// What one forwarding round offered and delivered, in packets per second.
struct Rate {
    offered: f64,
    delivered: f64,
}

/// Offers `seconds` of UDP to the public address from the client, from `senders`
/// threads at once (each a live-frames BPF_PROG_RUN generator, XDP_TX out of the
/// client's veth, which has a queue per sender), and counts what reached the VM
/// stand-in.
fn veth_rate(t: &Topo, pin: &PinDir, seconds: f64, senders: usize) -> Result<Rate> {
    let client_mac = mac(&t.client.name, "c0")?;
    let host_mac = mac(&t.host.name, "up0")?;
    let parse = |s: &str| -> [u8; 6] {
        let mut m = [0u8; 6];
        for (i, p) in s.split(':').enumerate() {
            m[i] = u8::from_str_radix(p, 16).unwrap_or(0);
        }
        m
    };
    // Loading pins the maps: one sender at a time, then all start together.
    let loading = std::sync::Arc::new(std::sync::Mutex::new(()));
    let ready = std::sync::Arc::new(std::sync::Barrier::new(senders + 1));
    let gens: Vec<_> = (0..senders)
        .map(|i| {
            // One flow per sender (its own source port), so the receive side can
            // spread them over queues as a NIC's RSS would.
            let mut p = Ip4::udp((CLIENT, 40000 + i as u16), (PUBLIC, 9), &[0u8; 22]);
            p.src_mac = parse(&client_mac);
            p.dst_mac = parse(&host_mac);
            let frame = p.frame();
            let pin = pin.clone();
            let (loading, ready) = (loading.clone(), ready.clone());
            t.client.run(move || {
                let loaded = {
                    let _one = loading.lock().unwrap_or_else(|e| e.into_inner());
                    load(&pin)
                };
                // Every sender reaches the barrier, loaded or not, so none waits forever.
                ready.wait();
                let mut ebpf = loaded?;
                let mut gen_map: aya::maps::Array<_, [u8; 64]> =
                    aya::maps::Array::try_from(ebpf.map_mut("BOXD_GEN").context("BOXD_GEN")?)?;
                let template: [u8; 64] = frame.as_slice().try_into().context("a 64-byte frame")?;
                gen_map.set(0, template, 0)?;
                let tx: &mut Xdp = ebpf.program_mut(progs::TX).context("tx")?.try_into()?;
                let ifindex = boxd_datapath::netdev::ifindex("c0")?;
                // struct xdp_md: data 0, data_end = length, ingress ifindex = c0.
                let mut ctx = [0u8; 24];
                ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
                ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
                let t0 = Instant::now();
                let mut sent = 0u64;
                let chunk = 100_000u32;
                while t0.elapsed().as_secs_f64() < seconds {
                    tx.test_run(TestRunOptions {
                        data_in: Some(&frame),
                        ctx_in: Some(&ctx),
                        repeat: chunk,
                        attrs: TestRunAttrs::new().xdp_live_frames(64),
                        ..Default::default()
                    })?;
                    sent += u64::from(chunk);
                }
                Ok(sent)
            })
        })
        .collect();
    ready.wait();
    let before = rx_packets(&t.vm.name, "vm0")?;
    let t0 = Instant::now();
    let mut sent = 0;
    for g in gens {
        sent += g
            .join()
            .map_err(|_| anyhow::anyhow!("generator thread"))??;
    }
    let took = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let got = rx_packets(&t.vm.name, "vm0")? - before;
    Ok(Rate {
        offered: sent as f64 / took,
        delivered: got as f64 / took,
    })
}

/// Makes the router's and the VM program's rewrites idempotent so a repeated run keeps
/// taking the same path: the link address is also routed like a public address (DNAT
/// rewrites it to itself), and the port's public address is the link address (SNAT
/// rewrites it to itself). Every lookup, checksum update and redirect still happens.
fn make_repeatable(ebpf: &mut aya::Ebpf, tap0: u32) -> Result<()> {
    use boxd_datapath::common::{PortEntry, VmEntry, maps};
    let link = u32::from_ne_bytes(LINK);
    let public = u32::from_ne_bytes(PUBLIC);
    let mut vms: aya::maps::HashMap<_, u32, VmEntry> =
        aya::maps::HashMap::try_from(ebpf.map_mut(maps::VMS).context("VMS")?)?;
    let vm = vms.get(&public, 0)?;
    vms.insert(link, vm, 0)?;
    let mut ports: aya::maps::HashMap<_, u32, PortEntry> =
        aya::maps::HashMap::try_from(ebpf.map_mut(maps::PORTS).context("PORTS")?)?;
    ports.insert(
        tap0,
        PortEntry {
            public_addr: link,
            vm_id: vm.vm_id,
            slot: vm.slot,
        },
        0,
    )?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    bench::check_args(&args, &["--seconds", "--rounds", "--senders"], &[])?;
    let seconds: f64 = bench::arg(&args, "--seconds", 2.0)?;
    let rounds: usize = bench::arg(&args, "--rounds", bench::ROUNDS_MIN)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let senders: usize = bench::arg(&args, "--senders", cores)?;
    if !(0.5..=60.0).contains(&seconds) {
        bail!("--seconds {seconds} out of range (0.5..=60)");
    }
    if !(1..=16).contains(&senders) {
        bail!("--senders {senders} out of range (1..=16)");
    }
    bench::check_rounds(rounds)?;
    let t = topo("o", Mode::Ours)?;
    let dp = t.dp.as_ref().context("data path")?;
    let pin = PinDir(dp.pin.clone());
    let tap0 = {
        let out = run_ok({
            let mut c = std::process::Command::new("ip");
            c.args(["-n", &t.host.name, "-o", "link", "show", "dev", "tap0"]);
            c
        })?;
        String::from_utf8_lossy(&out.stdout)
            .split(':')
            .next()
            .unwrap_or("0")
            .trim()
            .parse::<u32>()?
    };
    let hellos = boxd_tests::root().join("tests/fixtures/tls/chromium-1.bin");
    let hello = std::fs::read(&hellos).with_context(|| format!("{}", hellos.display()))?;
    let pin2 = pin.clone();
    // Each XDP BPF_PROG_RUN call swaps the program into the XDP dispatcher, which waits
    // for an RCU grace period: few calls, many runs each.
    let calls = 200usize;
    let (router, snat, sni, floor) = t
        .host
        .run(move || {
            let mut ebpf = load(&pin2)?;
            make_repeatable(&mut ebpf, tap0)?;
            let mut udp = Ip4::udp((CLIENT, 40000), (PUBLIC, 53), &[0u8; 18]);
            udp.ttl = 255;
            let udp = udp.frame();
            let mut from_vm = Ip4::udp((LINK, 53), (CLIENT, 40000), &[0u8; 18]);
            from_vm.src_mac = [0x06, 0xb0, 0xc5, 0, 0, 2];
            let from_vm = from_vm.frame();
            let seg = Ip4::tcp(
                (CLIENT, 40001),
                ([198, 51, 100, 10], 443),
                1,
                0x18,
                &hello[..hello.len().min(1448)],
            )
            .frame();
            let xdp_prog =
                |e: &mut aya::Ebpf, name: &str, frame: &[u8], repeat: u32| -> Result<(f64, u32)> {
                    let p: &mut Xdp = e.program_mut(name).context("program")?.try_into()?;
                    let mut out = vec![0u8; frame.len()];
                    let mut per = Vec::with_capacity(calls);
                    let mut verdict = 0;
                    for _ in 0..calls {
                        let r = p.test_run(TestRunOptions {
                            data_in: Some(frame),
                            data_out: Some(&mut out),
                            repeat,
                            ..Default::default()
                        })?;
                        verdict = r.return_value;
                        per.push(r.duration.as_nanos() as u64);
                    }
                    Ok((median(per), verdict))
                };
            // TTL 255 and the link address routed like a public one: 250 runs in a row
            // all take the DNAT path.
            let mut rounds = Vec::new();
            for _ in 0..5 {
                let (r, v) = xdp_prog(&mut ebpf, progs::ROUTER, &udp, 250)?;
                ensure!(
                    v == 4,
                    "the router did not redirect the bench packet (verdict {v})"
                );
                rounds.push(r as u64);
            }
            eprintln!("router rounds (raw ns): {rounds:?}");
            let router = median(rounds);
            let (floor, _) = xdp_prog(&mut ebpf, progs::PASS, &udp, 250)?;
            let (sni, _) = xdp_prog(&mut ebpf, progs::SNI, &seg, 5000)?;
            let snat = {
                let p: &mut SchedClassifier = ebpf
                    .program_mut(progs::VM_EGRESS)
                    .context("vm")?
                    .try_into()?;
                let mut out = vec![0u8; from_vm.len() + 64];
                let mut ctx = [0u8; 192];
                ctx[40..44].copy_from_slice(&tap0.to_ne_bytes());
                let mut ctx_out = [0u8; 192];
                let mut per = Vec::with_capacity(calls);
                for _ in 0..calls {
                    let r = p.test_run(TestRunOptions {
                        data_in: Some(&from_vm),
                        data_out: Some(&mut out),
                        ctx_in: Some(&ctx),
                        ctx_out: Some(&mut ctx_out),
                        repeat: 250,
                        ..Default::default()
                    })?;
                    ensure!(
                        r.return_value == 7,
                        "the VM program did not redirect the bench packet ({})",
                        r.return_value
                    );
                    per.push(r.duration.as_nanos() as u64);
                }
                median(per)
            };
            Ok((router, snat, sni, floor))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bench thread"))??;
    let steer = boxd_datapath::tables::stats(&pin)?;
    ensure!(
        steer["sni-found"] > 0,
        "the SNI bench packet was not parsed to a name"
    );

    println!(
        "per packet (BPF_PROG_RUN, 250 runs per call, median of {calls} calls, minus an empty program's {floor:.0} ns):"
    );
    let router_ns = (router - floor).max(1.0);
    let snat_ns = (snat - floor).max(1.0);
    let sni_ns = (sni - floor).max(1.0);
    println!(
        "  router (DNAT, checksums, MACs, redirect)  {router_ns:>6.0} ns   (raw {router:.0})   target <= 60"
    );
    bench::published(
        "Katran's per-packet cost",
        "about 190 ns",
        "on bare metal, not this machine",
    );
    println!("  VM side (anti-spoof, SNAT, FIB, redirect) {snat_ns:>6.0} ns   (raw {snat:.0})");
    println!(
        "  SNI parse (Chromium ClientHello, 1448 B)   {sni_ns:>6.0} ns   (raw {sni:.0})   target <= 400"
    );
    // No peer runs these programs here: the lines carry no ratio.
    println!("BENCH xdp-router-ns {router_ns:.0} ns");
    println!("BENCH tc-snat-ns {snat_ns:.0} ns");
    println!("BENCH sni-parse-ns {sni_ns:.0} ns");

    // Forwarding on veth, ours and the kernel's, both topologies up at once and the
    // rounds interleaved.
    let peer = topo("k", Mode::Kernel)?;
    let sink = topo("s", Mode::Sink)?;
    // The peer's generator needs the object loaded (over maps of its own, attached nowhere).
    let gen_pin = PinDir(format!("/sys/fs/bpf/boxd-bench-gen-{}", std::process::id()).into());
    std::fs::create_dir_all(&gen_pin.0)?;
    let before = boxd_datapath::tables::stats(&pin)?;
    let (mut ours, mut kernel, mut capacity) = (Vec::new(), Vec::new(), Vec::new());
    let result = (|| -> Result<()> {
        for i in 0..rounds {
            let o = veth_rate(&t, &pin, seconds, senders)?;
            let k = veth_rate(&peer, &gen_pin, seconds, senders)?;
            let c = veth_rate(&sink, &gen_pin, seconds, senders)?;
            eprintln!(
                "  veth round {}: boxd {:.2} Mpps | kernel {:.2} | senders into a sink {:.2}",
                i + 1,
                o.delivered / 1e6,
                k.delivered / 1e6,
                c.offered / 1e6
            );
            ours.push(o);
            kernel.push(k);
            capacity.push(c);
        }
        Ok(())
    })();
    let _ = boxd_datapath::down(&gen_pin);
    result?;
    let after = boxd_datapath::tables::stats(&pin)?;
    let handled = after["router-packets"] - before["router-packets"];
    let failed = after["redirect-failed"] - before["redirect-failed"];
    bench::check_errors("router redirects", handled, failed)?;
    let mpps = |v: &[Rate], f: fn(&Rate) -> f64| v.iter().map(|r| f(r) / 1e6).collect::<Vec<_>>();
    let o_del = mpps(&ours, |r| r.delivered);
    let k_del = mpps(&kernel, |r| r.delivered);
    // On veth the senders and the forwarding share the CPUs (a frame is forwarded in
    // the softirq of the CPU that sent it), so each side's senders offer exactly what
    // it forwards. What they can offer when nothing is forwarded is the sink's rate:
    // a side below that was limited by its forwarding, not by its senders.
    let offer = mpps(&capacity, |r| r.offered);
    println!(
        "through the router on veth ({seconds} s rounds, 60-byte UDP, {senders} senders, one flow each):"
    );
    println!(
        "  the senders into a host that drops them: {} Mpps (what they can offer)",
        bench::describe(&offer)
    );
    println!(
        "  boxd XDP router delivered:   {} Mpps",
        bench::describe(&o_del)
    );
    println!(
        "  kernel + nft DNAT delivered: {} Mpps",
        bench::describe(&k_del)
    );
    const SATURATED: f64 = 0.95;
    let limit = SATURATED * bench::median(&offer);
    if bench::median(&o_del) < limit && bench::median(&k_del) < limit {
        bench::compare(
            "xdp-router-veth-mpps",
            "Mpps",
            &o_del,
            &k_del,
            "kernel+nft",
            Better::Higher,
        );
    } else {
        println!(
            "  a side delivered >= {:.0} % of what the senders can offer: they were its ceiling, no rate comparison from this run",
            SATURATED * 100.0
        );
        // Sender-limited: at least this much, and no ratio.
        println!(
            "BENCH xdp-router-veth-mpps {:.2} Mpps",
            bench::median(&o_del)
        );
    }
    bench::settings(
        "bpf",
        &[
            ("rounds", rounds.to_string()),
            ("seconds", seconds.to_string()),
            ("senders", senders.to_string()),
            ("frame_bytes", "60".into()),
            ("prog_run_calls", calls.to_string()),
            ("repeat_per_call", "250".into()),
        ],
    );
    Ok(())
}
