//! Can this host's KVM run a Linux guest? Measured, not guessed (ENVIRONMENT.md): some
//! hosts expose a working /dev/kvm whose ring-0 guest code is emulated instruction by
//! instruction, about a microsecond each, where a stock kernel needs minutes to boot or
//! stops on instructions the emulator lacks.
//!
//! The probe runs a tiny ring-0 loop in a throwaway VM and times it.

use crate::vmm::Vmm;
use crate::{ExitReason, VmConfig};
use std::time::Duration;

/// Loop iterations (two instructions each): long enough to swamp the cost of one exit,
/// short enough (~150 ms) where every instruction is emulated.
const ITERATIONS: u32 = 100_000;
/// Hardware runs the loop at well under 1 ns per instruction and the emulated KVM host
/// at under 10; a host that emulates ring 0 in software takes over 1000.
pub const HARDWARE_NS_PER_INSTRUCTION_MAX: f64 = 100.0;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct KvmSpeed {
    pub ns_per_instruction: f64,
    pub hardware_speed: bool,
}

/// The probe guest: mark the start on the debug port, count down, mark the end, power
/// off. Timing between the two marks leaves out the (large, on emulated hosts) cost of
/// entering the guest the first time.
fn code() -> Vec<u8> {
    let mut c = vec![
        0xb0, 0x00, // mov al, 0
        0x66, 0xba, 0x10, 0x05, // mov dx, DEBUG_PORT
        0xee, // out dx, al
        0xb9, // mov ecx, ITERATIONS
    ];
    c.extend_from_slice(&ITERATIONS.to_le_bytes());
    c.extend_from_slice(&[
        0xff, 0xc9, // dec ecx
        0x75, 0xfc, // jnz back to dec
        0xb0, 0x01, // mov al, 1
        0x66, 0xba, 0x10, 0x05, // mov dx, DEBUG_PORT
        0xee, // out dx, al
        0xb0, 0x34, // mov al, S5 | SLP_EN
        0x66, 0xba, 0x00, 0x06, // mov dx, ACPI_POWER_PORT
        0xee, // out dx, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ]);
    c
}

/// Runs the probe (tens of milliseconds).
pub fn kvm_speed() -> Result<KvmSpeed, String> {
    let mut vmm = Vmm::start(VmConfig::raw(code())).map_err(|e| e.to_string())?;
    let exit = vmm.wait_timeout(Duration::from_secs(10));
    let elapsed = vmm.milestone_span().ok_or_else(|| match &exit {
        Some(ExitReason::Crashed(why)) => format!("the KVM probe guest crashed: {why}"),
        other => format!("the KVM probe guest never finished its loop (exit: {other:?})"),
    })?;
    let ns = elapsed.as_nanos() as f64 / f64::from(ITERATIONS * 2);
    Ok(KvmSpeed {
        ns_per_instruction: ns,
        hardware_speed: ns <= HARDWARE_NS_PER_INSTRUCTION_MAX,
    })
}

/// What to tell someone whose host cannot run Linux guests.
pub fn refusal(speed: &KvmSpeed) -> String {
    format!(
        "this host's KVM runs guest kernel code at {:.0} ns per instruction: ring 0 is emulated \
         in software, not run by VT-x/AMD-V, so a Linux guest would take minutes to boot or stop \
         on an instruction KVM cannot emulate. Run boxd inside the emulated KVM host instead: \
         `cargo xtask testhost -- boxd vmm ...` (see README), or pass --skip-kvm-check to try anyway",
        speed.ns_per_instruction
    )
}
