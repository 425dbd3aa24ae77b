//! QEMU, a frontend nobody here wrote, on our backend: a Debian guest on QEMU's
//! software CPU with `-netdev vhost-user` (two queue pairs) on our port pings the host
//! and moves a file both ways over TCP through our TAP. No KVM needed.

use anyhow::{Context, Result, ensure};
use boxd_tests::net::{NetDaemon, Netns, http_serve, wait_link};
use boxd_tests::qemu::{GuestNet, Qemu};
use sha2::{Digest, Sha256};
use std::time::Duration;

#[test]
fn a_qemu_guest_pings_and_exchanges_tcp_through_our_backend() -> Result<()> {
    let d = NetDaemon::start("qemu")?;
    let mut spec = d.spec("qemu", "bxt-qemu");
    spec.queue_pairs = 2;
    d.add(spec)?;
    wait_link("bxt-qemu")?;
    let ns = Netns::new("bxt-qemu")?;
    ns.adopt("bxt-qemu", "10.0.0.1/30")?;
    let blob: Vec<u8> = (0..4u32 << 20).map(|i| (i * 13 + i / 511) as u8).collect();
    let want = Sha256::digest(&blob);
    let server = ns.run(move || {
        let l = std::net::TcpListener::bind("10.0.0.1:8080")?;
        http_serve(l, &blob, 2)
    });
    // systemd.run starts before networkd: the script sets the link up itself.
    // The transfers only run if the guest got both queue pairs.
    let script = "test -d /sys/class/net/eth0/queues/rx-1 || exit 1; \
                  ip link set eth0 up; ip addr add 10.0.0.2/30 dev eth0; \
                  ping -c 3 -w 60 10.0.0.1 && \
                  curl -sSf -o /tmp/b http://10.0.0.1:8080/blob && \
                  curl -sSf -T /tmp/b http://10.0.0.1:8080/up";
    let vm = Qemu::run(
        &d.dir.join("vm"),
        GuestNet::VhostUser(&d.dir.join("qemu.sock"), 2),
        2,
        script,
        Duration::from_secs(300),
    )?;
    ensure!(
        server.is_finished(),
        "the guest never completed both transfers; console:\n{}",
        vm.console_tail(3000)
    );
    let uploads = server.join().expect("server thread")?;
    let up = uploads.first().context("no upload")?;
    assert_eq!(Sha256::digest(up), want, "the file came back different");
    let s = d.stats("qemu")?;
    // 3 pings and a 4 MiB file each way, at the least.
    assert!(s.rx_bytes > 4 << 20 && s.tx_bytes > 4 << 20, "{s:#?}");
    // One QEMU (two if the first stalled in early boot and was started again).
    assert!((1..=2).contains(&s.connections), "{s:#?}");
    let drops =
        s.tx_drop_spoofed_mac + s.tx_drop_spoofed_ip + s.tx_drop_spoofed_arp + s.tx_drop_malformed;
    assert_eq!(
        drops, 0,
        "a well-behaved guest's frames were dropped: {s:#?}"
    );
    Ok(())
}
