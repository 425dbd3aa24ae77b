//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624, eqn. 3:
//! HC' = ~(~HC + ~m + m')).
//!
//! Values are 16-bit words as loaded from the packet in native order: the one's
//! complement sum is the same in either byte order, so loads and stores need no swaps.

/// Folds a 64-bit one's complement accumulator into 16 bits (three folds always suffice).
#[inline(always)]
pub fn fold(s: u64) -> u16 {
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum after a 32-bit field covered by it changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nf = !from;
    let s = (!check) as u64
        + (nf & 0xffff) as u64
        + (nf >> 16) as u64
        + (to & 0xffff) as u64
        + (to >> 16) as u64;
    !fold(s)
}

/// The checksum after a 16-bit field covered by it changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let s = (!check) as u64 + (!from) as u64 + to as u64;
    !fold(s)
}

/// A UDP checksum after an update: 0 means "no checksum" on the wire, so a computed 0
/// is sent as 0xffff (RFC 768).
#[inline(always)]
pub fn udp_fixup(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// The full checksum of `data` (for building and checking packets; not used in the
/// programs' fast paths).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// One's complement sum of `data` in native-order words, added to `acc`.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += u16::from_ne_bytes([*last, 0]) as u64;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip_header(dst: [u8; 4], ttl: u8) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, ttl, 6, 0, 0, 198, 51, 100, 7, dst[0], dst[1],
            dst[2], dst[3],
        ];
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        let before = ip_header([203, 0, 113, 7], 64);
        let after = ip_header([10, 0, 0, 2], 63);
        let check = u16::from_ne_bytes([before[10], before[11]]);
        let c = replace4(
            check,
            u32::from_ne_bytes([203, 0, 113, 7]),
            u32::from_ne_bytes([10, 0, 0, 2]),
        );
        let c = replace2(c, u16::from_ne_bytes([64, 6]), u16::from_ne_bytes([63, 6]));
        assert_eq!(c, u16::from_ne_bytes([after[10], after[11]]));
        assert_eq!(checksum(&after), 0, "a correct header sums to zero");
    }

    #[test]
    fn many_random_updates_match() {
        // A small xorshift: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..10_000 {
            let mut data = [0u8; 40];
            for b in data.iter_mut() {
                *b = next() as u8;
            }
            data[10] = 0;
            data[11] = 0;
            let c = checksum(&data);
            data[10..12].copy_from_slice(&c.to_ne_bytes());
            let from = u32::from_ne_bytes(data[16..20].try_into().unwrap());
            let to = next() as u32;
            data[16..20].copy_from_slice(&to.to_ne_bytes());
            let inc = replace4(c, from, to);
            data[10] = 0;
            data[11] = 0;
            let full = checksum(&data);
            // 0x0000 and 0xffff are the same number in one's complement.
            assert!(inc == full || (inc == 0xffff && full == 0) || (inc == 0 && full == 0xffff));
        }
    }
}
