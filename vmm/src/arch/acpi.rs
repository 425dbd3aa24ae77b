//! ACPI tables: how a stock distribution kernel finds boxd's CPUs, interrupt controllers
//! and virtio-mmio devices.
//!
//! Debian's kernels ship virtio as modules and cannot take virtio-mmio devices on the
//! command line, but their `virtio_mmio` driver binds ACPI devices with _HID "LNRO0005".
//! So the DSDT lists each device's MMIO window and interrupt, the MADT lists the local
//! APICs and the IOAPIC, and a hardware-reduced FADT (no PM timer, no SCI, no legacy
//! i8042 to probe) points at an I/O port for power-off and reset.

use super::aml::{self, Aml};
use super::layout::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// A virtio-mmio device as the guest should see it.
#[derive(Debug, Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

const OEM_ID: &[u8; 6] = b"BOXD  ";
const OEM_TABLE_ID: &[u8; 8] = b"BOXDVMM ";
const CREATOR_ID: &[u8; 4] = b"BOXD";

/// The value the guest writes to the power port to reboot (FADT RESET_VALUE).
pub const RESET_VALUE: u8 = 1;
/// S5 sleep type; the guest writes `SLP_TYP << 2 | SLP_EN` to the power port to power off.
pub const S5_SLEEP_TYPE: u8 = 5;
pub const SLEEP_ENABLE: u8 = 1 << 5;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: header plus body, checksummed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, filled below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure for one byte in I/O space.
fn io_gas(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn dsdt(devices: &[MmioDevice], ged_irq: u32) -> Vec<u8> {
    let names: Vec<aml::NameSeg> = (0..devices.len())
        .map(|i| aml::NameSeg(format!("VR{i:02X}")))
        .collect();
    let resources: Vec<aml::ResourceTemplate> = devices
        .iter()
        .map(|d| {
            aml::ResourceTemplate(vec![
                aml::Resource::Memory32Fixed {
                    base: d.base as u32,
                    length: d.size as u32,
                },
                aml::Resource::EdgeInterrupt { irq: d.irq },
            ])
        })
        .collect();
    let uids: Vec<u64> = (0..devices.len() as u64).collect();
    let hid = "LNRO0005";
    let one = 1u64;
    let name_hid = aml::Path("_HID");
    let name_uid = aml::Path("_UID");
    let name_cca = aml::Path("_CCA");
    let name_crs = aml::Path("_CRS");
    let hid_names: Vec<aml::Name> = devices
        .iter()
        .map(|_| aml::Name {
            path: &name_hid,
            value: &hid,
        })
        .collect();
    let uid_names: Vec<aml::Name> = uids
        .iter()
        .map(|u| aml::Name {
            path: &name_uid,
            value: u,
        })
        .collect();
    let cca_names: Vec<aml::Name> = devices
        .iter()
        .map(|_| aml::Name {
            path: &name_cca,
            value: &one,
        })
        .collect();
    let crs_names: Vec<aml::Name> = resources
        .iter()
        .map(|r| aml::Name {
            path: &name_crs,
            value: r,
        })
        .collect();
    let device_nodes: Vec<aml::Device> = (0..devices.len())
        .map(|i| aml::Device {
            name: &names[i],
            body: vec![&hid_names[i], &uid_names[i], &cca_names[i], &crs_names[i]],
        })
        .collect();
    // A power button (PNP0C0C) and a Generic Event Device (ACPI0013) whose interrupt
    // "presses" it: the VMM's graceful shutdown, which the guest's logind turns into a
    // clean poweroff, with no agent involved.
    let pwrb_name = aml::Path("PWRB");
    let pwrb_hid_value = "PNP0C0C";
    let pwrb_hid = aml::Name {
        path: &name_hid,
        value: &pwrb_hid_value,
    };
    let zero = 0u64;
    let pwrb_uid = aml::Name {
        path: &name_uid,
        value: &zero,
    };
    let pwrb = aml::Device {
        name: &pwrb_name,
        body: vec![&pwrb_hid, &pwrb_uid],
    };
    let ged_name = aml::Path("GED");
    let ged_hid_value = "ACPI0013";
    let ged_hid = aml::Name {
        path: &name_hid,
        value: &ged_hid_value,
    };
    let ged_uid = aml::Name {
        path: &name_uid,
        value: &zero,
    };
    let ged_res = aml::ResourceTemplate(vec![aml::Resource::EdgeInterrupt { irq: ged_irq }]);
    let ged_crs = aml::Name {
        path: &name_crs,
        value: &ged_res,
    };
    let evt_name = aml::Path("_EVT");
    let pwrb_path = aml::Path("\\_SB.PWRB");
    let evt = aml::NotifyMethod {
        name: &evt_name,
        args: 1,
        target: &pwrb_path,
        value: 0x80,
    };
    let ged = aml::Device {
        name: &ged_name,
        body: vec![&ged_hid, &ged_uid, &ged_crs, &evt],
    };
    let sb = aml::Path("\\_SB");
    let mut sb_body: Vec<&dyn Aml> = device_nodes.iter().map(|d| d as &dyn Aml).collect();
    sb_body.push(&pwrb);
    sb_body.push(&ged);
    let scope = aml::Scope {
        path: &sb,
        body: sb_body,
    };
    // \_S5: the sleep type the guest writes to power off.
    let s5_path = aml::Path("\\_S5");
    let s5_value = aml::Package(vec![u64::from(S5_SLEEP_TYPE), 0]);
    let s5 = aml::Name {
        path: &s5_path,
        value: &s5_value,
    };
    let mut body = scope.to_bytes();
    s5.encode(&mut body);
    sdt(b"DSDT", 2, &body)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;
    const PWR_BUTTON: u32 = 1 << 4; // set = no fixed-feature power button
    const SLP_BUTTON: u32 = 1 << 5;
    // IAPC_BOOT_ARCH: no VGA (bit 2), no CMOS RTC (bit 5); bit 1 (8042) clear so the
    // kernel does not spend boot time probing a keyboard controller.
    const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

    let mut body = vec![0u8; 276 - 36];
    let at = |off: usize| off - 36;
    body[at(40)..at(44)].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    body[at(109)..at(111)].copy_from_slice(&IAPC_BOOT_ARCH.to_le_bytes());
    body[at(112)..at(116)].copy_from_slice(
        &(HW_REDUCED_ACPI | RESET_REG_SUP | PWR_BUTTON | SLP_BUTTON).to_le_bytes(),
    );
    body[at(116)..at(128)].copy_from_slice(&io_gas(ACPI_POWER_PORT));
    body[at(128)] = RESET_VALUE;
    body[at(131)] = 5; // FADT minor version (ACPI 6.5)
    body[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes());
    body[at(244)..at(256)].copy_from_slice(&io_gas(ACPI_POWER_PORT));
    body[at(256)..at(268)].copy_from_slice(&io_gas(ACPI_SLEEP_STATUS_PORT));
    body[at(268)..at(276)].copy_from_slice(b"BOXDVMM\0");
    sdt(b"FACP", 6, &body)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: dual 8259s present
    for id in 0..vcpus {
        // Processor local APIC: type 0, length 8, uid, APIC id, flags (enabled).
        body.extend_from_slice(&[0, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // IOAPIC: type 1, length 12, id, reserved, address, GSI base.
    body.extend_from_slice(&[1, 12, 0, 0]);
    body.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Local APIC NMI: type 4, length 6, all processors, flags, LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &body)
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = tables.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

fn rsdp(xsdt_addr: u64) -> [u8; 36] {
    let mut r = [0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2; // ACPI 2.0+: use the XSDT
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    r[8] = checksum(&r[0..20]);
    r[32] = checksum(&r);
    r
}

/// Every table, laid out from `ACPI_START`; returns (address, bytes) pairs, RSDP first.
pub fn tables(vcpus: u8, devices: &[MmioDevice], ged_irq: u32) -> Vec<(u64, Vec<u8>)> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let dsdt_addr = align(rsdp_addr + 36);
    let dsdt = dsdt(devices, ged_irq);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let xsdt = xsdt(&[fadt_addr, madt_addr]);
    assert!(
        xsdt_addr + xsdt.len() as u64 <= ACPI_START + ACPI_MAX_SIZE,
        "ACPI tables overflow their reserved window"
    );
    vec![
        (rsdp_addr, rsdp(xsdt_addr).to_vec()),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ]
}

/// Writes the tables into guest memory; returns the RSDP's address for boot_params.
pub fn write<M: GuestMemory>(
    mem: &M,
    vcpus: u8,
    devices: &[MmioDevice],
    ged_irq: u32,
) -> Result<u64, vm_memory::GuestMemoryError> {
    let tables = tables(vcpus, devices, ged_irq);
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))?;
    }
    Ok(tables[0].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Vec<MmioDevice> {
        (0..3)
            .map(|i| MmioDevice {
                base: VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                irq: VIRTIO_IRQ_START + i as u32,
            })
            .collect()
    }

    #[test]
    fn every_table_checksums_to_zero() {
        for (_, bytes) in tables(4, &devices(), 9) {
            if bytes.starts_with(b"RSD PTR ") {
                assert_eq!(bytes[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
                assert_eq!(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            } else {
                assert_eq!(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
                let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, bytes.len());
            }
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_and_points_at_the_dsdt() {
        let t = tables(1, &devices(), 9);
        let dsdt_addr = t[1].0;
        let fadt = &t[2].1;
        assert_eq!(&fadt[0..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        assert_eq!(
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
            dsdt_addr
        );
    }

    /// The real check of our AML: ACPICA's disassembler must read the DSDT back into the
    /// devices we meant. Skips (saying so) where `iasl` is not installed.
    #[test]
    fn iasl_disassembles_the_dsdt_into_our_devices() {
        let dir = tempdir().expect("a scratch directory for iasl");
        let t = tables(2, &devices(), 9);
        let path = dir.join("dsdt.dat");
        std::fs::write(&path, &t[1].1).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&path)
            .output();
        let Ok(out) = out else {
            boxd_testkit::skip!(
                "iasl is not installed (`cargo xtask setup` installs acpica-tools)"
            );
        };
        assert!(
            out.status.success(),
            "iasl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        assert_eq!(dsl.matches("\"LNRO0005\"").count(), 3, "{dsl}");
        assert!(dsl.contains("0xD0001000"), "{dsl}");
        assert!(
            dsl.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"),
            "{dsl}"
        );
        assert!(dsl.contains("_S5, Package (0x02)"), "{dsl}");
        assert!(dsl.contains("\"ACPI0013\""), "{dsl}");
        assert!(
            dsl.contains("Notify (PWRB, 0x80)") || dsl.contains("Notify (\\_SB.PWRB, 0x80)"),
            "{dsl}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempdir() -> std::io::Result<std::path::PathBuf> {
        let dir = std::env::temp_dir().join(format!("boxd-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}
