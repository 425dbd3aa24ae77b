//! The emulated KVM host itself: a command's stdout, stderr and exit code come back
//! separately, /dev/kvm works inside, and a forwarded port reaches a server inside.

use anyhow::Result;
use boxd_tests::testhost::TestHost;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[test]
fn the_test_host_runs_commands_with_kvm_and_forwards_ports() -> Result<()> {
    if std::env::var_os("BOXD_IN_TESTHOST").is_some() {
        boxd_tests::skip!("already inside the test host (no test host nests in another)");
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let host = TestHost {
        forwards: vec![(port, 8080)],
        timeout: Duration::from_secs(300),
        ..Default::default()
    };
    // Inside: report on KVM, then answer exactly one HTTP request, then exit 5.
    let server = "import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); \
                  s.bind(('0.0.0.0', 8080)); s.listen(1); c,_=s.accept(); c.recv(1024); \
                  c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\nfrom inside'); c.close()";
    let script = format!(
        "test -c /dev/kvm && echo kvm-ok; echo to-stderr >&2; timeout 240 python3 -c \"{server}\"; exit 5"
    );
    let runner = std::thread::spawn(move || host.run(&["sh".into(), "-c".into(), script]));

    let deadline = Instant::now() + Duration::from_secs(240);
    let body = loop {
        let attempt = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut r = String::new();
            s.read_to_string(&mut r)?;
            Ok(r)
        });
        match attempt {
            Ok(r) if r.contains("from inside") => break r,
            _ if Instant::now() > deadline => anyhow::bail!("the forwarded port never answered"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    let outcome = runner
        .join()
        .map_err(|_| anyhow::anyhow!("runner panicked"))??;
    assert_eq!(outcome.exit_code, 5);
    assert_eq!(String::from_utf8_lossy(&outcome.stdout), "kvm-ok\n");
    assert_eq!(String::from_utf8_lossy(&outcome.stderr), "to-stderr\n");
    Ok(())
}
