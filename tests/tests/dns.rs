//! Authoritative DNS end to end: a real `boxd server` (no guest needed: machines are
//! created without waiting for them to boot), asked with `dig` over UDP and TCP, and
//! with raw packets for what `dig` will not send.

use anyhow::{Result, ensure};
use boxd_tests::api::{Options, PUBLIC, Server, ZONE};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

/// Waits (bounded) until `dig ARGS` prints something containing `want`; how long it took.
fn until(s: &Server, args: &[&str], want: &str, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let out = s.dig(args)?;
        if out.contains(want) {
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < limit,
            "`dig {}` did not say {want:?} within {limit:?}; last answer:\n{out}",
            args.join(" ")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A query for `name`/`qtype` (class IN, RD clear) with id `id`.
fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.push(0);
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p
}

#[test]
fn dns_follows_machines() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("boxd-dns-{}", std::process::id()));
    let s = Server::start(&dir, 22240, &Options::default(), &["alice"])?;
    let app = format!("app.{ZONE}");

    // Apex: SOA, NS with glue, A; authoritative, no recursion offered.
    let soa = s.dig(&[ZONE, "SOA", "+norec"])?;
    ensure!(
        soa.contains("status: NOERROR") && soa.contains(" aa"),
        "{soa}"
    );
    ensure!(
        soa.contains(&format!("ns1.{ZONE}. hostmaster.{ZONE}.")),
        "{soa}"
    );
    ensure!(!soa.contains(" ra"), "recursion must not be offered: {soa}");
    let ns = s.dig(&[ZONE, "NS"])?;
    ensure!(
        ns.contains(&format!("ns1.{ZONE}.")) && ns.contains(&format!("\tA\t{PUBLIC}")),
        "NS with glue: {ns}"
    );

    // A machine's name appears with `new` and goes with `rm`, each within a second.
    let nx = s.dig(&[&app, "A"])?;
    ensure!(
        nx.contains("status: NXDOMAIN") && nx.contains("SOA"),
        "{nx}"
    );
    s.json("alice", &["new", "--name=app", "--no-wait"])?;
    let t = until(
        &s,
        &[&app, "A"],
        &format!("\tA\t{PUBLIC}"),
        Duration::from_secs(5),
    )?;
    ensure!(
        t < Duration::from_secs(1),
        "the record took {t:?} to appear"
    );
    let info = s.json("alice", &["info", "app"])?;
    ensure!(info["domain"] == app.as_str(), "domain: {info}");
    // Same answer over TCP; case does not matter; a type the name lacks is NODATA.
    let tcp = s.dig(&["APP.Boxd.Test", "A", "+tcp"])?;
    ensure!(tcp.contains(&format!("\tA\t{PUBLIC}")), "TCP: {tcp}");
    let aaaa = s.dig(&[&app, "AAAA"])?;
    ensure!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
        "{aaaa}"
    );
    // ANY gets RFC 8482's single HINFO, not the whole name.
    let any = s.dig(&[&app, "ANY"])?;
    ensure!(any.contains("HINFO") && any.contains("ANSWER: 1"), "{any}");
    // Outside the zone: refused, never resolved.
    let out = s.dig(&["example.com", "A"])?;
    ensure!(out.contains("status: REFUSED"), "{out}");
    let t0 = Instant::now();
    s.json("alice", &["rm", "app"])?;
    until(&s, &[&app, "A"], "status: NXDOMAIN", Duration::from_secs(5))?;
    let t = t0.elapsed();
    ensure!(t < Duration::from_secs(2), "rm took {t:?} to reach DNS");

    // Bad packets: nothing or a clean error, and the server keeps answering.
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let server = format!("127.0.0.1:{}", s.dns_port());
    let mut buf = [0u8; 4096];
    for bad in [
        vec![],
        vec![1, 2, 3],
        vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63],
        vec![0xff; 512],
        {
            // A label pointer loop.
            let mut p = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            p.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
            p
        },
    ] {
        sock.send_to(&bad, &server)?;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            ensure!(n >= 12, "a short answer to a bad packet");
            ensure!(buf[2] & 0x80 != 0, "an answer that is not a response");
            ensure!(buf[3] & 0x0f != 0, "a bad packet answered with NOERROR");
        }
    }
    let ok = s.dig(&[ZONE, "SOA"])?;
    ensure!(ok.contains("status: NOERROR"), "after bad packets: {ok}");

    // Rate limit: 200 answers a second per source, bursts of 400. A burst of 2000 from
    // one source gets about 400 answers; of the rest, every other gets an empty
    // truncated answer (a real resolver then asks over TCP) and the others nothing.
    // Room for every answer of the burst on our side (the default buffer holds about
    // 256 datagrams): what this counts is the server's limit, not our socket's.
    let big: libc::c_int = 4 << 20;
    // SAFETY: setsockopt on our own socket with a valid int value and its size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &big as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "SO_RCVBUFFORCE on the test's socket (needs root): {}",
        std::io::Error::last_os_error()
    );
    let t0 = Instant::now();
    let mut sent = 0;
    let (mut answered, mut truncated) = (0, 0);
    sock.set_nonblocking(true)?;
    for i in 0..2000u16 {
        sock.send_to(&query(i, ZONE, 6), &server)?;
        sent += 1;
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n >= 12 && buf[2] & 0x02 != 0 {
                truncated += 1;
            } else {
                answered += 1;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        if n >= 12 && buf[2] & 0x02 != 0 {
            truncated += 1;
        } else {
            answered += 1;
        }
    }
    let allowed = 400.0 + 200.0 * secs;
    eprintln!(
        "burst of {sent} in {secs:.2}s: {answered} answered, {truncated} truncated, {} dropped",
        sent - answered - truncated
    );
    ensure!(
        answered as f64 <= allowed + 10.0,
        "{answered} answers in {secs:.2}s is over the limit ({allowed:.0})"
    );
    ensure!(
        answered >= 300,
        "only {answered} answers: the burst allowance is 400"
    );
    ensure!(
        truncated > 200,
        "over the limit, every other query gets TC ({truncated})"
    );
    ensure!(
        answered + truncated < sent,
        "over the limit, some queries must get nothing"
    );
    // TCP is not rate limited (a source must complete a handshake).
    let tcp = s.dig(&[ZONE, "SOA", "+tcp"])?;
    ensure!(
        tcp.contains("status: NOERROR"),
        "TCP after the burst: {tcp}"
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
