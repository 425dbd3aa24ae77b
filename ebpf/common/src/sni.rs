//! The TLS ClientHello server_name parser, shared by the XDP program and the host.
//!
//! It reads a segment's payload from a fixed scratch buffer (a per-CPU map value in the
//! kernel), so every index is masked into the buffer and every loop has a constant
//! bound: the verifier accepts it and the host tests the same code on real ClientHellos.
//!
//! A ClientHello often spans two TCP segments (a browser's is about 2 KB). The parser
//! needs the fixed part (record and handshake headers, random, session id, cipher suites,
//! compression methods) in the first segment, which every client sends well inside one
//! MSS; from then on it walks the extensions and, when it runs out of segment, says how
//! to go on: skip the rest of an extension in the next segment, or carry a few bytes (an
//! extension header cut in two, or a whole server_name extension cut in two) and parse
//! them with the next segment appended. Anything else falls open.

use crate::{CARRY_MAX, NAME_MAX, SNI_MAX_SEGMENTS, SniFlow};

/// Scratch buffer size: carried bytes plus one segment's payload, a power of two.
pub const SCRATCH: usize = 4096;
const MASK: usize = SCRATCH - 1;
/// Bytes of a segment's payload the parser looks at.
pub const PAYLOAD_MAX: usize = 2048;
/// Extensions walked per segment (a browser sends about 16-20).
pub const MAX_EXTENSIONS: usize = 64;

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Why the parser gave up: the connection goes to the proxy as if no parser existed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    /// Not a TLS handshake record carrying a ClientHello.
    NotClientHello,
    /// Lengths that contradict each other.
    Malformed,
    /// The extensions ended without a server_name.
    NoServerName,
    /// A name longer than DNS allows, or a server_name extension too big to carry.
    TooLong,
    /// The fixed part of the ClientHello did not fit in the first segment.
    HeaderSplit,
    /// More extensions than the parser walks.
    TooManyExtensions,
    /// The ClientHello went on for more segments than the parser follows, or a segment
    /// was longer than the parser reads.
    TooManySegments,
    /// A segment that is not the next one of the flow (reordered, lost, retransmitted).
    OutOfOrder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The server_name: its hash ([`name_hash`]) and where it sits in the buffer.
    Found {
        hash: u64,
        off: u32,
        len: u32,
    },
    /// The name is further on: keep `buf[carry_from..len]`, and in the next segment
    /// (appended after the carried bytes) skip `skip` bytes and parse the remaining
    /// `ext_left` bytes of extensions (counted from the first carried byte).
    More {
        carry_from: u32,
        ext_left: u32,
        skip: u32,
    },
    Fail(Fail),
}

#[inline(always)]
fn b(buf: &[u8; SCRATCH], i: usize) -> usize {
    buf[i & MASK] as usize
}

#[inline(always)]
fn be16(buf: &[u8; SCRATCH], i: usize) -> usize {
    (b(buf, i) << 8) | b(buf, i + 1)
}

/// Lowercases ASCII and mixes one byte into an FNV-1a hash.
#[inline(always)]
pub fn hash_byte(h: u64, c: u8) -> u64 {
    let c = if c.is_ascii_uppercase() { c + 32 } else { c };
    (h ^ c as u64).wrapping_mul(FNV_PRIME)
}

/// The key of a domain in BOXD_DOMAINS: FNV-1a over the ASCII-lowercased name.
pub fn name_hash(name: &[u8]) -> u64 {
    name.iter().fold(FNV_OFFSET, |h, &c| hash_byte(h, c))
}

/// Parses the start of a ClientHello: `buf[..len]` is the first segment's payload.
#[inline(always)]
pub fn parse_hello(buf: &[u8; SCRATCH], len: usize) -> Outcome {
    let len = if len > SCRATCH { SCRATCH } else { len };
    if len < 9 {
        return Outcome::Fail(Fail::HeaderSplit);
    }
    // TLS record: handshake (22), version 3.x, length.
    if b(buf, 0) != 22 || b(buf, 1) != 3 {
        return Outcome::Fail(Fail::NotClientHello);
    }
    let rec_len = be16(buf, 3);
    // Handshake: ClientHello (1), 24-bit length.
    if b(buf, 5) != 1 {
        return Outcome::Fail(Fail::NotClientHello);
    }
    let hs_len = (b(buf, 6) << 16) | (be16(buf, 7));
    if hs_len + 4 > rec_len {
        // A ClientHello fragmented over several records: rare, left to the proxy.
        return Outcome::Fail(Fail::Malformed);
    }
    let body_end = 9 + hs_len;
    // client_version (2) + random (32).
    let mut off = 9 + 34;
    if off + 1 > len {
        return Outcome::Fail(Fail::HeaderSplit);
    }
    let sid = b(buf, off);
    if sid > 32 {
        return Outcome::Fail(Fail::Malformed);
    }
    off += 1 + sid;
    if off + 2 > len {
        return Outcome::Fail(Fail::HeaderSplit);
    }
    let suites = be16(buf, off);
    if suites == 0 || suites & 1 != 0 {
        return Outcome::Fail(Fail::Malformed);
    }
    off += 2 + suites;
    if off + 1 > len {
        return Outcome::Fail(Fail::HeaderSplit);
    }
    let comp = b(buf, off);
    off += 1 + comp;
    if off >= body_end {
        return Outcome::Fail(Fail::NoServerName);
    }
    if off + 2 > len {
        return Outcome::Fail(Fail::HeaderSplit);
    }
    let ext_total = be16(buf, off);
    off += 2;
    let ext_end = off + ext_total;
    if ext_end > body_end {
        return Outcome::Fail(Fail::Malformed);
    }
    parse_extensions(buf, len, off, ext_end)
}

/// Walks extensions in `buf[..len]` from `off` to `ext_end` (which may lie beyond `len`:
/// the block continues in the next segment).
#[inline(always)]
pub fn parse_extensions(buf: &[u8; SCRATCH], len: usize, off: usize, ext_end: usize) -> Outcome {
    let len = if len > SCRATCH { SCRATCH } else { len };
    let mut off = off;
    for _ in 0..MAX_EXTENSIONS {
        if off >= ext_end {
            return Outcome::Fail(if off == ext_end {
                Fail::NoServerName
            } else {
                Fail::Malformed
            });
        }
        if ext_end - off < 4 {
            return Outcome::Fail(Fail::Malformed);
        }
        if off >= len {
            // The segment ended inside an extension's body: skip the rest of it next.
            return Outcome::More {
                carry_from: len as u32,
                ext_left: (ext_end - len) as u32,
                skip: (off - len) as u32,
            };
        }
        if off + 4 > len {
            // An extension header cut in two: carry its first bytes.
            return Outcome::More {
                carry_from: off as u32,
                ext_left: (ext_end - off) as u32,
                skip: 0,
            };
        }
        let ty = be16(buf, off);
        let elen = be16(buf, off + 2);
        let next = off + 4 + elen;
        if next > ext_end {
            return Outcome::Fail(Fail::Malformed);
        }
        if ty == 0 {
            if next > len {
                if next - off > CARRY_MAX {
                    return Outcome::Fail(Fail::TooLong);
                }
                return Outcome::More {
                    carry_from: off as u32,
                    ext_left: (ext_end - off) as u32,
                    skip: 0,
                };
            }
            return server_name(buf, off + 4, elen);
        }
        off = next;
    }
    Outcome::Fail(Fail::TooManyExtensions)
}

/// The first host_name of a server_name extension whose body is `buf[body..body+elen]`.
#[inline(always)]
fn server_name(buf: &[u8; SCRATCH], body: usize, elen: usize) -> Outcome {
    if elen < 5 {
        return Outcome::Fail(Fail::Malformed);
    }
    let list = be16(buf, body);
    if list + 2 > elen || list < 3 {
        return Outcome::Fail(Fail::Malformed);
    }
    if b(buf, body + 2) != 0 {
        // Only host_name (0) is defined.
        return Outcome::Fail(Fail::Malformed);
    }
    let nlen = be16(buf, body + 3);
    if nlen == 0 || nlen + 3 > list {
        return Outcome::Fail(Fail::Malformed);
    }
    if nlen > NAME_MAX {
        return Outcome::Fail(Fail::TooLong);
    }
    let start = body + 5;
    let mut h = FNV_OFFSET;
    for i in 0..NAME_MAX {
        if i >= nlen {
            break;
        }
        h = hash_byte(h, buf[(start + i) & MASK]);
    }
    Outcome::Found {
        hash: h,
        off: start as u32,
        len: nlen as u32,
    }
}

/// What to do with a segment once parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Found in this segment: the flow's state (if any) can go.
    Found {
        hash: u64,
        off: u32,
        len: u32,
    },
    /// Not yet: `flow` now holds what the next segment needs; save it.
    Save,
    Fail(Fail),
}

/// Puts a saved flow's carried bytes at the start of the scratch buffer; the segment's
/// payload goes right after them. Returns how many bytes were carried.
#[inline(always)]
pub fn load_carry(flow: &SniFlow, buf: &mut [u8; SCRATCH]) -> usize {
    buf[..CARRY_MAX].copy_from_slice(&flow.carry);
    let n = flow.carry_len as usize;
    if n > CARRY_MAX { CARRY_MAX } else { n }
}

/// Parses a segment: `buf[..carry_len]` are the bytes carried from the flow's earlier
/// segments (none for a first segment), `buf[carry_len..carry_len + payload_len]` the
/// payload. `resumed` says whether `flow` came from the map; `truncated`, that the
/// payload is longer than what was loaded. `seq` is the segment's TCP sequence number.
#[inline(always)]
pub fn step(
    flow: &mut SniFlow,
    resumed: bool,
    buf: &[u8; SCRATCH],
    carry_len: usize,
    payload_len: usize,
    seq: u32,
    truncated: bool,
) -> Step {
    let len = carry_len + payload_len;
    let out = if resumed {
        parse_extensions(buf, len, flow.skip as usize, flow.ext_left as usize)
    } else {
        parse_hello(buf, len)
    };
    match out {
        Outcome::Found { hash, off, len } => Step::Found { hash, off, len },
        Outcome::Fail(f) => Step::Fail(f),
        Outcome::More {
            carry_from,
            ext_left,
            skip,
        } => {
            if truncated || flow.segments + 1 >= SNI_MAX_SEGMENTS {
                return Step::Fail(Fail::TooManySegments);
            }
            let from = carry_from as usize;
            let clen = len - from;
            if clen > CARRY_MAX {
                return Step::Fail(Fail::TooLong);
            }
            for i in 0..CARRY_MAX {
                if i >= clen {
                    break;
                }
                flow.carry[i] = buf[(from + i) & MASK];
            }
            flow.carry_len = clen as u16;
            flow.ext_left = ext_left;
            flow.skip = skip;
            flow.next_seq = seq.wrapping_add(payload_len as u32);
            flow.segments += 1;
            Step::Save
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello like a browser's: `before` bytes of extensions ahead of the
    /// server_name, `after` bytes behind it.
    pub fn hello(name: &[u8], before: usize, after: usize) -> ([u8; 3000], usize) {
        let mut body = [0u8; 3000];
        let mut n = 0;
        let mut put = |bytes: &[u8], n: &mut usize| {
            body[*n..*n + bytes.len()].copy_from_slice(bytes);
            *n += bytes.len();
        };
        put(&[3, 3], &mut n);
        put(&[7; 32], &mut n);
        put(&[32], &mut n);
        put(&[9; 32], &mut n);
        put(&[0, 4, 0x13, 0x01, 0x13, 0x02], &mut n);
        put(&[1, 0], &mut n);
        let ext_len = (4 + before) + (4 + 5 + name.len()) + (4 + after);
        put(&(ext_len as u16).to_be_bytes(), &mut n);
        // A padding-like extension (type 21) of `before` bytes.
        put(&[0, 21], &mut n);
        put(&(before as u16).to_be_bytes(), &mut n);
        for _ in 0..before {
            put(&[0], &mut n);
        }
        put(&[0, 0], &mut n);
        put(&((5 + name.len()) as u16).to_be_bytes(), &mut n);
        put(&((3 + name.len()) as u16).to_be_bytes(), &mut n);
        put(&[0], &mut n);
        put(&(name.len() as u16).to_be_bytes(), &mut n);
        put(name, &mut n);
        put(&[0x11, 0x11], &mut n);
        put(&(after as u16).to_be_bytes(), &mut n);
        for _ in 0..after {
            put(&[1], &mut n);
        }
        let mut out = [0u8; 3000];
        out[0] = 22;
        out[1] = 3;
        out[2] = 1;
        out[3..5].copy_from_slice(&((n + 4) as u16).to_be_bytes());
        out[5] = 1;
        out[6] = 0;
        out[7..9].copy_from_slice(&(n as u16).to_be_bytes());
        out[9..9 + n].copy_from_slice(&body[..n]);
        (out, 9 + n)
    }

    /// Feeds `segments` of a stream through `step` the way the XDP program does.
    /// `Err(None)`: the parser still waited for more when the segments ran out.
    pub fn run(stream: &[u8], cuts: &[usize]) -> Result<(u64, usize), Option<Fail>> {
        let mut flow = SniFlow::default();
        let mut resumed = false;
        let mut start = 0;
        let mut seq = 1000u32;
        let mut bounds: [usize; 8] = [0; 8];
        let mut nb = 0;
        for &c in cuts {
            bounds[nb] = c;
            nb += 1;
        }
        bounds[nb] = stream.len();
        nb += 1;
        for (i, &end) in bounds[..nb].iter().enumerate() {
            let mut buf = [0u8; SCRATCH];
            let carry = if resumed {
                load_carry(&flow, &mut buf)
            } else {
                0
            };
            if resumed && flow.next_seq != seq {
                return Err(Some(Fail::OutOfOrder));
            }
            let payload = &stream[start..end];
            let take = payload.len().min(PAYLOAD_MAX);
            buf[carry..carry + take].copy_from_slice(&payload[..take]);
            match step(
                &mut flow,
                resumed,
                &buf,
                carry,
                take,
                seq,
                take < payload.len(),
            ) {
                Step::Found { hash, .. } => return Ok((hash, i + 1)),
                Step::Fail(f) => return Err(Some(f)),
                Step::Save => resumed = true,
            }
            seq = seq.wrapping_add(payload.len() as u32);
            start = end;
        }
        Err(None)
    }

    #[test]
    fn finds_the_name_in_one_segment() {
        let (h, n) = hello(b"My-App.boxd.example", 100, 100);
        assert_eq!(
            run(&h[..n], &[]),
            Ok((name_hash(b"my-app.boxd.example"), 1))
        );
    }

    #[test]
    fn finds_the_name_at_every_cut_point() {
        // A 2 KB ClientHello with the name after a 1.2 KB extension (a post-quantum key
        // share): cut it at every byte after the fixed part.
        let (h, n) = hello(b"split.boxd.example", 1300, 600);
        let want = name_hash(b"split.boxd.example");
        let fixed = 9 + 34 + 33 + 6 + 2 + 2;
        for cut in fixed..n {
            let got = run(&h[..n], &[cut]);
            let seg = if cut >= fixed + 4 + 1300 + 4 + 5 + 18 {
                1
            } else {
                2
            };
            assert_eq!(got, Ok((want, seg)), "cut at {cut}");
        }
        for cut in 1..fixed {
            assert_eq!(
                run(&h[..n], &[cut]),
                Err(Some(Fail::HeaderSplit)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn three_segments_and_limits() {
        let (h, n) = hello(b"three.boxd.example", 1800, 10);
        let want = name_hash(b"three.boxd.example");
        assert_eq!(run(&h[..n], &[500, 1000]), Ok((want, 3)));
        assert_eq!(
            run(&h[..n], &[300, 600, 900, 1200]),
            Err(Some(Fail::TooManySegments))
        );
    }

    #[test]
    fn malformed_and_odd_input_falls_open() {
        let (mut h, n) = hello(b"x.example", 10, 10);
        assert_eq!(run(&h[..n], &[]).map(|r| r.1), Ok(1));
        h[0] = 23; // application data, not a handshake
        assert_eq!(run(&h[..n], &[]), Err(Some(Fail::NotClientHello)));
        let (mut h, n) = hello(b"x.example", 10, 10);
        h[5] = 2; // ServerHello
        assert_eq!(run(&h[..n], &[]), Err(Some(Fail::NotClientHello)));
        let (mut h, n) = hello(b"x.example", 10, 10);
        h[43] = 33; // session id longer than 32
        assert_eq!(run(&h[..n], &[]), Err(Some(Fail::Malformed)));
        // A name longer than DNS allows.
        let long = [b'a'; 254];
        let (h, n) = hello(&long, 10, 10);
        assert_eq!(run(&h[..n], &[]), Err(Some(Fail::TooLong)));
        // Truncated mid-extension and never continued: the parser waits for more.
        let (h, n) = hello(b"x.example", 100, 10);
        assert_eq!(run(&h[..n - 60], &[]), Err(None));
        // Lengths that overrun: the extension block claims more than the handshake.
        let (mut h, n) = hello(b"x.example", 10, 10);
        let at = 9 + 34 + 33 + 6 + 2;
        h[at] = 0xff;
        assert_eq!(run(&h[..n], &[]), Err(Some(Fail::Malformed)));
        // Every single-byte corruption: never a panic, never a wrong name.
        let (h, n) = hello(b"fuzz.example", 40, 40);
        let want = name_hash(b"fuzz.example");
        for i in 0..n {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut c = h;
                c[i] = v;
                if let Ok((hash, _)) = run(&c[..n], &[n / 2]) {
                    // Corrupting the name or its length changes the name; anything else
                    // keeps it or fails.
                    let name_at = n - 4 - 40 - 12;
                    if !(name_at - 2..name_at + 12).contains(&i) {
                        assert_eq!(hash, want, "byte {i} = {v}");
                    }
                }
            }
        }
    }
}
