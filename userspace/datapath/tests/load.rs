//! The object loads and passes the verifier (every program), and `down` leaves nothing
//! behind in the pin directory. Needs root (CAP_BPF, CAP_NET_ADMIN).

use boxd_datapath::{PinDir, load};

#[test]
fn every_program_passes_the_verifier_and_down_leaves_nothing_behind() {
    if !boxd_testkit::is_root() {
        boxd_testkit::skip!("loading BPF programs needs root");
    }
    let pin = PinDir(format!("/sys/fs/bpf/boxd-load-{}", std::process::id()).into());
    boxd_datapath::ensure_bpffs(&pin).unwrap();
    std::fs::create_dir_all(&pin.0).unwrap();
    let r = load(&pin);
    let down = boxd_datapath::down(&pin);
    if let Err(e) = r {
        panic!("{e}");
    }
    let removed = down.unwrap_or_else(|e| panic!("down: {e}"));
    assert!(removed > 0, "down found nothing pinned after a load");
    assert!(!pin.0.exists(), "down left {} behind", pin.0.display());
}
