//! Just enough AML (ACPI Machine Language, ACPI 6.5 chapter 20) to describe boxd's
//! devices in the DSDT: scopes, devices, named integers/strings/packages and resource
//! templates. Encoding only; the kernel's interpreter is the reader, and the tests check
//! the output against `iasl -d`.

/// Something that encodes itself as AML bytes.
pub trait Aml {
    fn encode(&self, out: &mut Vec<u8>);

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const QWORD_PREFIX: u8 = 0x0e;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const METHOD_OP: u8 = 0x14;
const NOTIFY_OP: u8 = 0x86;
const EXT_OP_PREFIX: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;
const ROOT_CHAR: u8 = b'\\';
const DUAL_NAME_PREFIX: u8 = 0x2e;

/// PkgLength: the length of what follows *including* the PkgLength bytes themselves.
fn pkg_length(body_len: usize, out: &mut Vec<u8>) {
    // Try 1..=4 encoding bytes; the total must fit the chosen encoding.
    let total1 = body_len + 1;
    if total1 < 0x40 {
        out.push(total1 as u8);
        return;
    }
    for extra in 1..=3usize {
        let total = body_len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            out.push(((extra as u8) << 6) | (total & 0xf) as u8);
            for i in 0..extra {
                out.push((total >> (4 + 8 * i)) as u8);
            }
            return;
        }
    }
    panic!("AML package of {body_len} bytes exceeds the 256 MiB PkgLength limit");
}

/// A name path: `\_SB_`, `_HID`, `VR00`, or a two-segment `\_SB_.VR00`.
pub struct Path(pub &'static str);

fn name_seg(seg: &str, out: &mut Vec<u8>) {
    assert!(
        !seg.is_empty() && seg.len() <= 4,
        "AML name segment {seg:?} must be 1..=4 chars"
    );
    let mut bytes = [b'_'; 4];
    bytes[..seg.len()].copy_from_slice(seg.as_bytes());
    out.extend_from_slice(&bytes);
}

impl Aml for Path {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut s = self.0;
        if let Some(rest) = s.strip_prefix('\\') {
            out.push(ROOT_CHAR);
            s = rest;
        }
        let segs: Vec<&str> = s.split('.').collect();
        match segs.len() {
            1 => name_seg(segs[0], out),
            2 => {
                out.push(DUAL_NAME_PREFIX);
                name_seg(segs[0], out);
                name_seg(segs[1], out);
            }
            n => panic!("AML paths of {n} segments are not needed by boxd"),
        }
    }
}

/// An owned name, for generated device names like `VR07`.
pub struct NameSeg(pub String);

impl Aml for NameSeg {
    fn encode(&self, out: &mut Vec<u8>) {
        name_seg(&self.0, out);
    }
}

impl Aml for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        let v = *self;
        match v {
            0 => out.push(ZERO_OP),
            1 => out.push(ONE_OP),
            2..=0xff => out.extend_from_slice(&[BYTE_PREFIX, v as u8]),
            0x100..=0xffff => {
                out.push(WORD_PREFIX);
                out.extend_from_slice(&(v as u16).to_le_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                out.push(DWORD_PREFIX);
                out.extend_from_slice(&(v as u32).to_le_bytes());
            }
            _ => {
                out.push(QWORD_PREFIX);
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

impl Aml for &str {
    fn encode(&self, out: &mut Vec<u8>) {
        assert!(
            self.is_ascii() && !self.contains('\0'),
            "AML strings are ASCII without NUL"
        );
        out.push(STRING_PREFIX);
        out.extend_from_slice(self.as_bytes());
        out.push(0);
    }
}

/// `Name(path, value)`.
pub struct Name<'a> {
    pub path: &'a dyn Aml,
    pub value: &'a dyn Aml,
}

impl Aml for Name<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(NAME_OP);
        self.path.encode(out);
        self.value.encode(out);
    }
}

fn with_pkg(op: &[u8], head: &dyn Aml, body: &[&dyn Aml], out: &mut Vec<u8>) {
    let mut inner = head.to_bytes();
    for item in body {
        item.encode(&mut inner);
    }
    out.extend_from_slice(op);
    pkg_length(inner.len(), out);
    out.extend_from_slice(&inner);
}

/// `Scope(path) { ... }`.
pub struct Scope<'a> {
    pub path: &'a dyn Aml,
    pub body: Vec<&'a dyn Aml>,
}

impl Aml for Scope<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        with_pkg(&[SCOPE_OP], self.path, &self.body, out);
    }
}

/// `Device(name) { ... }`.
pub struct Device<'a> {
    pub name: &'a dyn Aml,
    pub body: Vec<&'a dyn Aml>,
}

impl Aml for Device<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        with_pkg(&[EXT_OP_PREFIX, DEVICE_OP], self.name, &self.body, out);
    }
}

/// `Method(name, args) { Notify(target, value) }`: the only method boxd needs, the
/// GED's `_EVT`, which turns its interrupt into a power-button press.
pub struct NotifyMethod<'a> {
    pub name: &'a dyn Aml,
    pub args: u8,
    pub target: &'a dyn Aml,
    pub value: u64,
}

impl Aml for NotifyMethod<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.args <= 7, "AML methods take at most 7 arguments");
        let mut inner = self.name.to_bytes();
        inner.push(self.args); // MethodFlags: arg count, not serialized, sync level 0
        inner.push(NOTIFY_OP);
        self.target.encode(&mut inner);
        self.value.encode(&mut inner);
        out.push(METHOD_OP);
        pkg_length(inner.len(), out);
        out.extend_from_slice(&inner);
    }
}

/// `Package() { integers... }`.
pub struct Package(pub Vec<u64>);

impl Aml for Package {
    fn encode(&self, out: &mut Vec<u8>) {
        assert!(
            self.0.len() < 256,
            "AML package with more than 255 elements"
        );
        let mut inner = vec![self.0.len() as u8];
        for v in &self.0 {
            v.encode(&mut inner);
        }
        out.push(PACKAGE_OP);
        pkg_length(inner.len(), out);
        out.extend_from_slice(&inner);
    }
}

/// One descriptor inside a resource template.
pub enum Resource {
    /// `Memory32Fixed(ReadWrite, base, length)`.
    Memory32Fixed { base: u32, length: u32 },
    /// `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { irq }`.
    EdgeInterrupt { irq: u32 },
    /// `IO(Decode16, port, port, 1, length)`.
    Io { port: u16, length: u8 },
}

/// `ResourceTemplate() { ... }`, a buffer of resource descriptors ending with an end tag.
pub struct ResourceTemplate(pub Vec<Resource>);

impl Aml for ResourceTemplate {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        for r in &self.0 {
            match r {
                Resource::Memory32Fixed { base, length } => {
                    // Large item 0x86, 9 bytes: RW flag, base, length.
                    data.extend_from_slice(&[0x86, 9, 0, 1]);
                    data.extend_from_slice(&base.to_le_bytes());
                    data.extend_from_slice(&length.to_le_bytes());
                }
                Resource::EdgeInterrupt { irq } => {
                    // Extended interrupt, large item 0x89: flags = consumer | edge,
                    // active-high, exclusive; one interrupt number.
                    data.extend_from_slice(&[0x89, 6, 0, 0b0000_0011, 1]);
                    data.extend_from_slice(&irq.to_le_bytes());
                }
                Resource::Io { port, length } => {
                    // Small item 0x47, 7 bytes: 16-bit decode, min, max, alignment, length.
                    data.extend_from_slice(&[0x47, 1]);
                    data.extend_from_slice(&port.to_le_bytes());
                    data.extend_from_slice(&port.to_le_bytes());
                    data.extend_from_slice(&[1, *length]);
                }
            }
        }
        // End tag with a zero checksum ("treat as correct").
        data.extend_from_slice(&[0x79, 0]);
        let mut inner = (data.len() as u64).to_bytes();
        inner.extend_from_slice(&data);
        out.push(BUFFER_OP);
        pkg_length(inner.len(), out);
        out.extend_from_slice(&inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkg_length_uses_one_byte_below_64_and_more_above() {
        let mut out = Vec::new();
        pkg_length(10, &mut out);
        assert_eq!(out, [11]);
        out.clear();
        // 100 bytes of body + 2 length bytes = 102 = 0x66: lead 0x46, then 0x06.
        pkg_length(100, &mut out);
        assert_eq!(out, [0x46, 0x06]);
        out.clear();
        pkg_length(5000, &mut out);
        let total = 5000 + 3;
        assert_eq!(
            out,
            [
                0x80 | (total & 0xf) as u8,
                (total >> 4) as u8,
                (total >> 12) as u8
            ]
        );
    }

    #[test]
    fn integers_use_the_smallest_encoding() {
        assert_eq!(0u64.to_bytes(), [ZERO_OP]);
        assert_eq!(1u64.to_bytes(), [ONE_OP]);
        assert_eq!(5u64.to_bytes(), [BYTE_PREFIX, 5]);
        assert_eq!(0x1234u64.to_bytes(), [WORD_PREFIX, 0x34, 0x12]);
        assert_eq!(0xd000_0000u64.to_bytes(), [DWORD_PREFIX, 0, 0, 0, 0xd0]);
    }

    #[test]
    fn names_are_padded_to_four_characters() {
        assert_eq!(Path("\\_SB").to_bytes(), b"\\_SB_");
        assert_eq!(Path("_S5").to_bytes(), b"_S5_");
    }
}
