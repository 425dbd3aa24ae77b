//! Captures real browser ClientHellos into tests/fixtures/tls for the SNI parser's
//! fixture tests (`cargo xtask capture-hellos`). Chromium randomises its extension order,
//! so several captures put the server_name at different offsets; each file is one TLS
//! record exactly as Chromium sent it.

use anyhow::{Result, bail};
use boxd_tests::tls::{self, Client};

fn main() -> Result<()> {
    let n: usize = std::env::args().nth(1).map_or(Ok(6), |s| s.parse())?;
    if !Client::Chromium.available() {
        bail!("chromium is not installed (apt-get install chromium)");
    }
    let dir = boxd_tests::root().join("tests/fixtures/tls");
    std::fs::create_dir_all(&dir)?;
    for i in 0..n {
        let hello = tls::capture(Client::Chromium, "my-app.boxd.example")?;
        let (at, len) = tls::sni_position(&hello).unwrap_or((0, 0));
        let path = dir.join(format!("chromium-{i}.bin"));
        std::fs::write(&path, &hello)?;
        println!(
            "{}: {} bytes, server_name at {at}..{} ({} segment on a 1500-byte link)",
            path.display(),
            hello.len(),
            at + len,
            if at + len <= 1448 { "first" } else { "second" }
        );
    }
    Ok(())
}
