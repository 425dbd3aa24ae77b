//! The object loads and passes the verifier (every program), and `up`/`down` leave
//! nothing behind. Needs root (CAP_BPF, CAP_NET_ADMIN).

use boxd_datapath::{PinDir, load};

#[test]
fn every_program_passes_the_verifier() {
    let pin = PinDir(format!("/sys/fs/bpf/boxd-load-{}", std::process::id()).into());
    boxd_datapath::ensure_bpffs(&pin).unwrap();
    std::fs::create_dir_all(&pin.0).unwrap();
    let r = load(&pin);
    let _ = boxd_datapath::down(&pin);
    if let Err(e) = r {
        panic!("{e}");
    }
}
