//! What boxd's eBPF programs and its userspace loader agree on: map names, the
//! `#[repr(C)]` keys and values, counter indices, and two pieces of pure logic that
//! both sides run (incremental checksums and the TLS ClientHello parser), so the host
//! tests them on real bytes and the kernel runs the very same code.
//!
//! Addresses are `u32` holding the four address bytes in network order, read and
//! written as native integers (`u32::from_ne_bytes(addr.octets())`): the programs
//! compare them straight out of the packet and `bpftool map dump` shows them in byte
//! order.

#![no_std]

pub mod csum;
pub mod sni;

/// Where everything is pinned, unless the operator says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/boxd";

/// Map names (the pin file names under the pin directory).
pub mod maps {
    pub const CONFIG: &str = "BOXD_CONFIG";
    pub const VMS: &str = "BOXD_VMS";
    pub const PORTS: &str = "BOXD_PORTS";
    pub const NODES: &str = "BOXD_NODES";
    pub const DOMAINS: &str = "BOXD_DOMAINS";
    pub const PROXIES: &str = "BOXD_PROXIES";
    pub const DEVMAP: &str = "BOXD_DEVMAP";
    pub const VM_STATS: &str = "BOXD_VM_STATS";
    pub const RATE: &str = "BOXD_RATE";
    pub const STATS: &str = "BOXD_STATS";
    pub const WAKE_LAST: &str = "BOXD_WAKE_LAST";
    pub const EVENTS: &str = "BOXD_EVENTS";
    pub const SNI_FLOWS: &str = "BOXD_SNI_FLOWS";
    pub const STEER: &str = "BOXD_STEER";
    pub const JUMP: &str = "BOXD_JUMP";
}

/// Program names (the functions in the eBPF object).
pub mod progs {
    pub const ROUTER: &str = "boxd_router";
    pub const SNI: &str = "boxd_sni";
    pub const VM_EGRESS: &str = "boxd_vm";
    pub const PASS: &str = "boxd_pass";
    pub const TX: &str = "boxd_tx";
}

/// Map sizes: every map is bounded.
pub const MAX_VMS: u32 = 65536;
/// VMs running on one node (counter slots; a per-CPU array is sized by it).
pub const MAX_LOCAL_VMS: u32 = 4096;
pub const MAX_NODES: u32 = 1024;
pub const MAX_DOMAINS: u32 = 65536;
pub const MAX_PROXIES: u32 = 64;
pub const MAX_PORTS: u32 = 65536;
pub const MAX_SNI_FLOWS: u32 = 8192;
pub const MAX_STEER: u32 = 65536;
/// Bytes of wake events the ring buffer holds before new ones are dropped (and counted).
pub const EVENTS_BYTES: u32 = 64 * 1024;

/// Slot of the SNI parser in the tail-call array.
pub const JUMP_SNI: u32 = 0;

/// `Config.flags`: this node has the uplink and owns public addresses (an edge).
pub const CFG_EDGE: u32 = 1;

/// The one configuration entry (index 0 of the CONFIG array).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// This node's id in the cluster.
    pub node_id: u32,
    /// This node's private address: encapsulated traffic is sent from and to it.
    pub node_addr: u32,
    /// The VM's side of the link every VM sees (for example 10.0.0.2).
    pub vm_addr: u32,
    /// The host's side of that link (for example 10.0.0.1).
    pub gw_addr: u32,
    /// `CFG_*` bits.
    pub flags: u32,
    /// The node whose uplink carries a worker's VM traffic out (when this is no edge).
    pub edge_node: u32,
    /// Least time between two wake events for the same VM.
    pub wake_interval_ns: u64,
    /// The uplink's MAC: ARP answers for public addresses carry it.
    pub uplink_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// `VmEntry.state`.
pub const VM_RUNNING: u8 = 1;
pub const VM_PAUSED: u8 = 2;
pub const VM_SUSPENDED: u8 = 3;
pub const VM_STOPPED: u8 = 4;

pub fn vm_state_name(state: u8) -> &'static str {
    match state {
        VM_RUNNING => "running",
        VM_PAUSED => "paused",
        VM_SUSPENDED => "suspended",
        VM_STOPPED => "stopped",
        _ => "unknown",
    }
}

/// A VM, keyed by its public IPv4 (BOXD_VMS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmEntry {
    /// The control plane's id for the machine.
    pub vm_id: u32,
    /// The node that runs it.
    pub node: u32,
    /// Its host port (TAP) on this node; 0 when it runs elsewhere.
    pub port_ifindex: u32,
    /// `VM_*`.
    pub state: u8,
    pub _pad0: u8,
    /// The guest's MAC on its link.
    pub vm_mac: [u8; 6],
    /// The host port's MAC: the source of frames sent to the guest.
    pub port_mac: [u8; 6],
    pub _pad1: [u8; 2],
    /// Its slot in BOXD_VM_STATS (1..=MAX_LOCAL_VMS) when it runs here; 0 elsewhere.
    /// A per-CPU array indexed by slot costs the router a few ns where a per-CPU hash
    /// keyed by address cost it about 40.
    pub slot: u32,
}

/// A local host port, keyed by ifindex (BOXD_PORTS): which VM sends through it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    pub public_addr: u32,
    pub vm_id: u32,
    /// The VM's counter slot (see `VmEntry::slot`).
    pub slot: u32,
}

/// A node, keyed by node id (BOXD_NODES).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeEntry {
    /// Its private address: where encapsulated traffic for its VMs goes.
    pub addr: u32,
    /// The interface and MACs that reach it, resolved by the reconciler: used when the
    /// kernel's FIB has no neighbour entry at that moment (XDP cannot resolve one).
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub flags: u32,
}

/// Longest domain name kept for display (DNS names are at most 253 bytes).
pub const NAME_MAX: usize = 253;

/// A domain, keyed by `sni::name_hash` of its lowercase name (BOXD_DOMAINS).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainEntry {
    /// The VM it belongs to (a key of BOXD_VMS).
    pub public_addr: u32,
    pub name_len: u32,
    pub name: [u8; 256],
}

impl Default for DomainEntry {
    fn default() -> Self {
        Self {
            public_addr: 0,
            name_len: 0,
            name: [0; 256],
        }
    }
}

/// Per-VM counters of the VMs on this node (per-CPU values, BOXD_VM_STATS, an array
/// indexed by the VM's slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct VmCounters {
    /// Toward the VM (after DNAT).
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// From the VM (after SNAT).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// From the VM with a source other than its link address.
    pub spoofed: u64,
    /// Over the VM's rate limit.
    pub rate_dropped: u64,
    /// Wake events raised for it.
    pub wakes: u64,
}

impl VmCounters {
    pub fn add(&mut self, o: &VmCounters) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.spoofed += o.spoofed;
        self.rate_dropped += o.rate_dropped;
        self.wakes += o.wakes;
    }
}

/// A token bucket for a VM's egress, keyed by public IPv4 (BOXD_RATE). The refill is
/// computed lazily from the time of the last packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained bytes per second (0: no limit).
    pub bytes_per_s: u64,
    /// Bucket size in bytes.
    pub burst: u64,
    /// Tokens at `last_ns`.
    pub tokens: u64,
    pub last_ns: u64,
}

/// A TCP flow toward a proxy address (BOXD_SNI_FLOWS, BOXD_STEER).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

/// Carry bytes kept between two segments: an extension header cut in two, or a whole
/// server_name extension (4 + 2 + 1 + 2 + 253) cut in two.
pub const CARRY_MAX: usize = 264;

/// A ClientHello whose server_name was not in the segment seen so far (BOXD_SNI_FLOWS).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniFlow {
    /// The TCP sequence number the next segment must start at.
    pub next_seq: u32,
    /// Bytes of the extensions block left, counted from the carry's first byte.
    pub ext_left: u32,
    /// Bytes of the next segment to skip before parsing (the rest of an extension).
    pub skip: u32,
    pub carry_len: u16,
    /// Segments parsed so far for this ClientHello.
    pub segments: u8,
    pub _pad: u8,
    pub carry: [u8; CARRY_MAX],
}

impl Default for SniFlow {
    fn default() -> Self {
        Self {
            next_seq: 0,
            ext_left: 0,
            skip: 0,
            carry_len: 0,
            segments: 0,
            _pad: 0,
            carry: [0; CARRY_MAX],
        }
    }
}

/// The parser follows a ClientHello over at most this many segments.
pub const SNI_MAX_SEGMENTS: u8 = 4;

/// What the SNI parser decided for a flow (BOXD_STEER): the proxy looks it up by the
/// connection's addresses and ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Steer {
    pub public_addr: u32,
    pub node: u32,
    pub vm_id: u32,
    /// The segment (1-based) the server_name was found in.
    pub segment: u32,
    pub name_hash: u64,
}

/// `WakeEvent.reason`.
pub const WAKE_PACKET: u32 = 1;
pub const WAKE_SNI: u32 = 2;

/// Sent on the BOXD_EVENTS ring buffer when traffic arrives for a VM that is not
/// running: at most one per VM per `Config.wake_interval_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WakeEvent {
    pub public_addr: u32,
    pub vm_id: u32,
    pub node: u32,
    /// `WAKE_*`.
    pub reason: u32,
    pub state: u32,
    pub _pad: u32,
    pub ktime_ns: u64,
}

/// Global counters (BOXD_STATS, a per-CPU array indexed by these).
pub mod stat {
    /// Packets seen by the router.
    pub const ROUTER_PACKETS: u32 = 0;
    /// Passed to the kernel untouched (not for us).
    pub const ROUTER_PASS: u32 = 1;
    /// DNATed and redirected to a local VM's port.
    pub const ROUTER_LOCAL: u32 = 2;
    /// Encapsulated toward the node that runs the VM.
    pub const ROUTER_ENCAP: u32 = 3;
    /// Decapsulated from another node.
    pub const ROUTER_DECAP: u32 = 4;
    /// ARP requests for public addresses answered.
    pub const ARP_REPLIES: u32 = 5;
    /// For a public address, with a truncated or inconsistent header: dropped.
    pub const BAD_HEADER: u32 = 6;
    /// For a public address with TTL <= 1: left to the kernel (ICMP time exceeded).
    pub const TTL_EXCEEDED: u32 = 7;
    /// For a VM on a node this node does not know: dropped.
    pub const NO_NODE: u32 = 8;
    /// Redirect failed (port missing from the device map): dropped.
    pub const REDIRECT_FAILED: u32 = 9;
    /// Wake events sent / lost because the ring buffer was full.
    pub const WAKE_SENT: u32 = 10;
    pub const WAKE_LOST: u32 = 11;
    /// VM side: packets from VMs SNATed and forwarded.
    pub const VM_FORWARDED: u32 = 12;
    /// VM side: to the host's link address, passed to the kernel.
    pub const VM_TO_HOST: u32 = 13;
    /// VM side: spoofed source, dropped.
    pub const VM_SPOOFED: u32 = 14;
    /// VM side: over the rate limit, dropped.
    pub const VM_RATE_DROPPED: u32 = 15;
    /// VM side: neither IPv4 nor ARP, dropped.
    pub const VM_ETHERTYPE: u32 = 16;
    /// SNI: ClientHellos whose server_name was found.
    pub const SNI_FOUND: u32 = 17;
    /// SNI: found in a later segment than the first.
    pub const SNI_FOUND_LATER: u32 = 18;
    /// SNI: parse carried into the next segment.
    pub const SNI_CARRIED: u32 = 19;
    /// SNI: fell open to the proxy (not TLS, malformed, no server_name, too long, out of
    /// order, unknown name).
    pub const SNI_FALLBACK: u32 = 20;
    /// SNI: the name is not a known domain.
    pub const SNI_UNKNOWN: u32 = 21;
    /// VM side: encapsulated toward the edge.
    pub const VM_ENCAP: u32 = 22;
    /// Router: a packet for a VM on this node whose port is not set.
    pub const NO_PORT: u32 = 23;
    /// Router: encapsulated with the reconciler's neighbour (the FIB had none).
    pub const ENCAP_STATIC_NEIGH: u32 = 24;
    pub const COUNT: u32 = 25;

    /// Names for tables and JSON, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "router-packets",
        "router-pass",
        "router-local",
        "router-encap",
        "router-decap",
        "arp-replies",
        "bad-header",
        "ttl-exceeded",
        "no-node",
        "redirect-failed",
        "wake-sent",
        "wake-lost",
        "vm-forwarded",
        "vm-to-host",
        "vm-spoofed",
        "vm-rate-dropped",
        "vm-ethertype",
        "sni-found",
        "sni-found-later-segment",
        "sni-carried",
        "sni-fallback",
        "sni-unknown-name",
        "vm-encap",
        "no-port",
        "encap-static-neighbour",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type here is #[repr(C)], Copy, made only of integers and byte
    // arrays, with explicit padding fields, so every bit pattern is a valid value and
    // there are no implicit padding bytes.
    unsafe impl aya::Pod for Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VmEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DomainEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VmCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RateLimit {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SniFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Steer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for WakeEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// The layouts are an ABI between the object and the loader: a changed size is a
    /// deliberate decision, not an accident.
    #[test]
    fn layouts_keep_their_abi_sizes() {
        assert_eq!(size_of::<Config>(), 40);
        assert_eq!(size_of::<VmEntry>(), 32);
        assert_eq!(size_of::<PortEntry>(), 12);
        assert_eq!(size_of::<NodeEntry>(), 24);
        assert_eq!(size_of::<DomainEntry>(), 264);
        assert_eq!(size_of::<VmCounters>(), 56);
        assert_eq!(size_of::<RateLimit>(), 32);
        assert_eq!(size_of::<FlowKey>(), 12);
        assert_eq!(size_of::<SniFlow>(), 16 + CARRY_MAX);
        assert_eq!(size_of::<Steer>(), 24);
        assert_eq!(size_of::<WakeEvent>(), 32);
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
    }
}
