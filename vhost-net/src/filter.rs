//! What a VM may send: frames from its own MAC and, for IPv4 and ARP, its own link
//! address. Every VM sees the same link (DESIGN.md), so its identity is the port it
//! sends on; a frame claiming another source is dropped and counted by reason.
//!
//! This runs on every guest frame and parses guest-controlled bytes, so it is a pure
//! function over a byte slice, bounds-checked everywhere and fuzzed.

use crate::tap::VNET_HDR_LEN;

/// The identity a port stamps on its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub mac: [u8; 6],
    pub ip: [u8; 4],
}

/// Why a guest frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Shorter than a virtio-net header plus an Ethernet header.
    Runt,
    /// Source MAC is not the VM's.
    SpoofedMac,
    /// IPv4 source address is not the VM's.
    SpoofedIp,
    /// ARP sender is not the VM's MAC and address.
    SpoofedArp,
    /// An EtherType the link does not carry (VLAN tags, IPv6, anything else).
    Ethertype,
}

pub const ETH_HDR_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;

/// Checks a guest frame (virtio-net header first) against the port's identity.
pub fn check(frame: &[u8], id: &Identity) -> Result<(), Drop> {
    let eth = frame.get(VNET_HDR_LEN..).ok_or(Drop::Runt)?;
    if eth.len() < ETH_HDR_LEN {
        return Err(Drop::Runt);
    }
    if eth[6..12] != id.mac {
        return Err(Drop::SpoofedMac);
    }
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let payload = &eth[ETH_HDR_LEN..];
    match ethertype {
        ETHERTYPE_IPV4 => {
            // Source address at bytes 12..16 of the IPv4 header.
            let src = payload.get(12..16).ok_or(Drop::Runt)?;
            if src != id.ip {
                return Err(Drop::SpoofedIp);
            }
            Ok(())
        }
        ETHERTYPE_ARP => {
            // Ethernet/IPv4 ARP: sender hardware address at 8..14, sender IP at 14..18.
            let sha = payload.get(8..14).ok_or(Drop::Runt)?;
            let spa = payload.get(14..18).ok_or(Drop::Runt)?;
            // An ARP probe announces nothing (sender IP 0.0.0.0) and is harmless.
            if sha != id.mac || (spa != id.ip && spa != [0, 0, 0, 0]) {
                return Err(Drop::SpoofedArp);
            }
            Ok(())
        }
        _ => Err(Drop::Ethertype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: Identity = Identity {
        mac: [6, 0xb0, 0xc5, 0, 0, 2],
        ip: [10, 0, 0, 2],
    };

    fn frame(src_mac: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(src: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0];
        h.extend_from_slice(&src);
        h.extend_from_slice(&[10, 0, 0, 1]);
        h
    }

    fn arp(sha: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&sha);
        a.extend_from_slice(&spa);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&[10, 0, 0, 1]);
        a
    }

    #[test]
    fn the_vms_own_traffic_passes() {
        assert_eq!(
            check(&frame(ID.mac, ETHERTYPE_IPV4, &ipv4(ID.ip)), &ID),
            Ok(())
        );
        assert_eq!(
            check(&frame(ID.mac, ETHERTYPE_ARP, &arp(ID.mac, ID.ip)), &ID),
            Ok(())
        );
        assert_eq!(
            check(&frame(ID.mac, ETHERTYPE_ARP, &arp(ID.mac, [0; 4])), &ID),
            Ok(())
        );
    }

    #[test]
    fn spoofed_and_foreign_frames_are_dropped_by_reason() {
        let other_mac = [2, 0, 0, 0, 0, 9];
        assert_eq!(
            check(&frame(other_mac, ETHERTYPE_IPV4, &ipv4(ID.ip)), &ID),
            Err(Drop::SpoofedMac)
        );
        assert_eq!(
            check(&frame(ID.mac, ETHERTYPE_IPV4, &ipv4([10, 0, 0, 3])), &ID),
            Err(Drop::SpoofedIp)
        );
        assert_eq!(
            check(&frame(ID.mac, ETHERTYPE_ARP, &arp(other_mac, ID.ip)), &ID),
            Err(Drop::SpoofedArp)
        );
        assert_eq!(
            check(
                &frame(ID.mac, ETHERTYPE_ARP, &arp(ID.mac, [10, 0, 0, 1])),
                &ID
            ),
            Err(Drop::SpoofedArp)
        );
        assert_eq!(
            check(&frame(ID.mac, 0x86dd, &[0; 40]), &ID),
            Err(Drop::Ethertype)
        );
        assert_eq!(
            check(&frame(ID.mac, 0x8100, &[0; 40]), &ID),
            Err(Drop::Ethertype)
        );
    }

    #[test]
    fn truncated_frames_are_runts_up_to_the_fields_checked() {
        let full = frame(ID.mac, ETHERTYPE_ARP, &arp(ID.mac, ID.ip));
        // An ARP frame is checked up to its sender protocol address (bytes 14..18 of
        // the payload): shorter is a runt, from there on it passes.
        let needed = VNET_HDR_LEN + ETH_HDR_LEN + 18;
        for len in 0..full.len() {
            let r = check(&full[..len], &ID);
            if len < needed {
                assert_eq!(r, Err(Drop::Runt), "len {len}");
            } else {
                assert!(r.is_ok(), "len {len}: {r:?}");
            }
        }
        assert_eq!(
            check(&full[..VNET_HDR_LEN + ETH_HDR_LEN + 10], &ID),
            Err(Drop::Runt)
        );
    }
}
