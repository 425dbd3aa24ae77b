//! boxd's data path in the kernel.
//!
//! - `boxd_router` (XDP, on the uplink and on the private interface between nodes):
//!   traffic for a VM's public IPv4 is DNATed to the link address every VM has, its
//!   MACs rewritten and redirected to the VM's host port; for a VM on another node it is
//!   encapsulated (IPIP) to that node; IPIP addressed to this node is decapsulated and
//!   routed the same way; ARP for public addresses is answered; TLS toward a proxy
//!   address goes to the SNI parser; everything else passes to the kernel untouched.
//! - `boxd_vm` (TC ingress on each VM's host port, i.e. what the VM sends): drops
//!   spoofed sources, applies the VM's rate limit, SNATs to its public IPv4 and sends it
//!   out (or encapsulates it to the edge node when this node has no uplink).
//! - `boxd_sni` (XDP, tail-called by the router): reads a ClientHello's server_name,
//!   across segments, records the steering decision and wakes a sleeping VM.
//! - `boxd_pass`: XDP_PASS, for veth peers that must run XDP to receive redirects.
//! - `boxd_tx`: XDP_TX, the benchmark's line-rate packet generator (live frames).

#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, xdp_action,
    },
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_xdp_adjust_head,
            bpf_xdp_load_bytes,
        },
    },
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use boxd_ebpf_common::{
    self as common, CFG_EDGE, Config, DomainEntry, FlowKey, NodeEntry, PortEntry, RateLimit,
    SniFlow, Steer, VM_RUNNING, VmCounters, VmEntry, WAKE_PACKET, WAKE_SNI, WakeEvent, csum, sni,
    stat,
};
use core::mem::size_of;

#[map]
static BOXD_CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
static BOXD_VMS: HashMap<u32, VmEntry> = HashMap::pinned(common::MAX_VMS, 0);
#[map]
static BOXD_PORTS: HashMap<u32, PortEntry> = HashMap::pinned(common::MAX_PORTS, 0);
#[map]
static BOXD_NODES: HashMap<u32, NodeEntry> = HashMap::pinned(common::MAX_NODES, 0);
#[map]
static BOXD_DOMAINS: HashMap<u64, DomainEntry> = HashMap::pinned(common::MAX_DOMAINS, 0);
#[map]
static BOXD_PROXIES: HashMap<u32, u32> = HashMap::pinned(common::MAX_PROXIES, 0);
/// Local VMs' ports by ifindex. (An array indexed by the VM's slot measured slower to
/// redirect through: 92 ns against 74 in `cargo xtask bench bpf`.)
#[map]
static BOXD_DEVMAP: DevMapHash = DevMapHash::pinned(common::MAX_PORTS, 0);
#[map]
static BOXD_VM_STATS: PerCpuArray<VmCounters> = PerCpuArray::pinned(common::MAX_LOCAL_VMS + 1, 0);
#[map]
static BOXD_RATE: HashMap<u32, RateLimit> = HashMap::pinned(common::MAX_VMS, 0);
#[map]
static BOXD_STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);
#[map]
static BOXD_WAKE_LAST: HashMap<u32, u64> = HashMap::pinned(common::MAX_VMS, 0);
#[map]
static BOXD_EVENTS: RingBuf = RingBuf::pinned(common::EVENTS_BYTES, 0);
#[map]
static BOXD_SNI_FLOWS: LruHashMap<FlowKey, SniFlow> = LruHashMap::pinned(common::MAX_SNI_FLOWS, 0);
#[map]
static BOXD_STEER: LruHashMap<FlowKey, Steer> = LruHashMap::pinned(common::MAX_STEER, 0);
#[map]
static BOXD_JUMP: ProgramArray = ProgramArray::pinned(4, 0);

/// Per-CPU scratch for the SNI parser: carried bytes plus a segment's payload.
#[map]
static SNI_SCRATCH: PerCpuArray<[u8; sni::SCRATCH]> = PerCpuArray::with_max_entries(1, 0);
/// Per-CPU scratch for a flow's parse state (too big for the 512-byte stack).
#[map]
static SNI_FLOW_SCRATCH: PerCpuArray<SniFlow> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;

#[inline(always)]
fn count(idx: u32) {
    if let Some(p) = BOXD_STATS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU array slot: only this CPU writes it while we run.
        unsafe { *p += 1 };
    }
}

/// A local VM's counters (slot 0: the VM has none here).
#[inline(always)]
fn vm_counters(slot: u32) -> Option<*mut VmCounters> {
    if slot == 0 {
        return None;
    }
    BOXD_VM_STATS.get_ptr_mut(slot)
}

/// A pointer to `size_of::<T>()` bytes at `off` in an XDP packet, checked against its end.
#[inline(always)]
fn xptr<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
fn ld16(p: *const u8) -> u16 {
    // SAFETY: callers pass pointers checked to have two readable bytes.
    unsafe { (p as *const u16).read_unaligned() }
}

#[inline(always)]
fn ld32(p: *const u8) -> u32 {
    // SAFETY: callers pass pointers checked to have four readable bytes.
    unsafe { (p as *const u32).read_unaligned() }
}

#[inline(always)]
fn st16(p: *mut u8, v: u16) {
    // SAFETY: callers pass pointers checked to have two writable bytes.
    unsafe { (p as *mut u16).write_unaligned(v) }
}

/// Writes the destination and source MACs of an Ethernet header.
#[inline(always)]
fn set_macs(eth: *mut u8, dst: &[u8; 6], src: &[u8; 6]) {
    for i in 0..6 {
        // SAFETY: callers pass a pointer to 14 bounds-checked bytes.
        unsafe {
            *eth.add(i) = dst[i];
            *eth.add(6 + i) = src[i];
        }
    }
}

#[inline(always)]
fn st32(p: *mut u8, v: u32) {
    // SAFETY: callers pass pointers checked to have four writable bytes.
    unsafe { (p as *mut u32).write_unaligned(v) }
}

/// Raises a wake event for a VM that is not running, at most once per interval.
#[inline(always)]
fn wake(cfg: &Config, addr: u32, vm: &VmEntry, reason: u32) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match BOXD_WAKE_LAST.get_ptr_mut(addr) {
        Some(last) => {
            // SAFETY: a value of a map that lives as long as the program; a racing CPU
            // can at worst send one extra event in the same interval.
            unsafe {
                if now.wrapping_sub(*last) < cfg.wake_interval_ns {
                    return;
                }
                *last = now;
            }
        }
        None => {
            if BOXD_WAKE_LAST.insert(addr, now, 0).is_err() {
                return;
            }
        }
    }
    let ev = WakeEvent {
        public_addr: addr,
        vm_id: vm.vm_id,
        node: vm.node,
        reason,
        state: vm.state as u32,
        _pad: 0,
        ktime_ns: now,
    };
    if BOXD_EVENTS.output::<WakeEvent>(&ev, 0).is_ok() {
        count(stat::WAKE_SENT);
        if let Some(c) = vm_counters(vm.slot) {
            // SAFETY: per-CPU value, only this CPU writes it now.
            unsafe { (*c).wakes += 1 };
        }
    } else {
        count(stat::WAKE_LOST);
    }
}

// ---------------------------------------------------------------------------------
// The router.

#[xdp]
pub fn boxd_router(ctx: XdpContext) -> u32 {
    count(stat::ROUTER_PACKETS);
    let Some(cfg) = BOXD_CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let cfg = *cfg;
    let v = router(&ctx, &cfg);
    if v == xdp_action::XDP_PASS {
        count(stat::ROUTER_PASS);
    }
    v
}

#[inline(always)]
fn router(ctx: &XdpContext, cfg: &Config) -> u32 {
    let Some(eth) = xptr::<[u8; ETH_HLEN]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let eth = eth as *mut u8;
    // SAFETY: the 14 Ethernet bytes were bounds-checked above.
    let proto = u16::from_be(ld16(unsafe { eth.add(12) }));
    match proto {
        ETH_P_IP => {}
        ETH_P_ARP => return arp(ctx, cfg),
        _ => return xdp_action::XDP_PASS,
    }
    let Some(ip) = xptr::<[u8; 20]>(ctx, ETH_HLEN) else {
        return xdp_action::XDP_PASS;
    };
    let ip = ip as *const u8;
    // SAFETY: the 20 fixed IPv4 header bytes were bounds-checked above.
    let (vihl, proto, dst) = unsafe { (*ip, *ip.add(9), ld32(ip.add(16))) };
    if vihl >> 4 != 4 {
        return xdp_action::XDP_PASS;
    }
    if proto == IPPROTO_IPIP && dst == cfg.node_addr && cfg.node_addr != 0 {
        if vihl != 0x45 || !decap(ctx) {
            count(stat::BAD_HEADER);
            return xdp_action::XDP_DROP;
        }
        count(stat::ROUTER_DECAP);
        return route(ctx, cfg, true);
    }
    route(ctx, cfg, false)
}

/// Routes an IPv4 packet whose Ethernet header is at 0.
#[inline(always)]
fn route(ctx: &XdpContext, cfg: &Config, decapped: bool) -> u32 {
    let Some(ip) = xptr::<[u8; 20]>(ctx, ETH_HLEN) else {
        return xdp_action::XDP_PASS;
    };
    let ip = ip as *mut u8;
    // SAFETY: the 20 fixed IPv4 header bytes were bounds-checked above.
    let (vihl, proto, src, dst) = unsafe { (*ip, *ip.add(9), ld32(ip.add(12)), ld32(ip.add(16))) };
    if vihl >> 4 != 4 {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: a map value; copied out at once.
    let Some(vm) = (unsafe { BOXD_VMS.get(dst) }).copied() else {
        if decapped {
            // From a worker: a VM's traffic leaving through this edge.
            // SAFETY: as above.
            if cfg.flags & CFG_EDGE != 0 && unsafe { BOXD_VMS.get(src) }.is_some() {
                return forward(ctx, src, dst);
            }
            return xdp_action::XDP_DROP;
        }
        if proto == IPPROTO_TCP && BOXD_PROXIES.get_ptr(dst).is_some() {
            // SAFETY: tail_call either jumps (never returns) or fails and returns.
            unsafe { BOXD_JUMP.tail_call(ctx, common::JUMP_SNI) };
        }
        return xdp_action::XDP_PASS;
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    // SAFETY: bounds-checked above.
    let tot_len = u16::from_be(ld16(unsafe { ip.add(2) })) as usize;
    let pkt_len = ctx.data_end() - ctx.data();
    if ihl < 20 || tot_len < ihl || ETH_HLEN + tot_len > pkt_len {
        count(stat::BAD_HEADER);
        return xdp_action::XDP_DROP;
    }
    // SAFETY: bounds-checked above.
    let ttl = unsafe { *ip.add(8) };
    if ttl <= 1 {
        count(stat::TTL_EXCEEDED);
        return xdp_action::XDP_PASS;
    }
    if vm.node != cfg.node_id {
        return encap(ctx, cfg, &vm, tot_len);
    }
    deliver(ctx, cfg, &vm, dst, ihl, tot_len)
}

/// DNAT to the link address and redirect to the VM's port on this node.
#[inline(always)]
fn deliver(
    ctx: &XdpContext,
    cfg: &Config,
    vm: &VmEntry,
    dst: u32,
    ihl: usize,
    tot_len: usize,
) -> u32 {
    if vm.port_ifindex == 0 {
        count(stat::NO_PORT);
        return xdp_action::XDP_DROP;
    }
    if vm.state != VM_RUNNING {
        // The port holds the frame while the VM is away; the event starts the resume.
        wake(cfg, dst, vm, WAKE_PACKET);
    }
    let Some(ip) = xptr::<[u8; 20]>(ctx, ETH_HLEN) else {
        return xdp_action::XDP_PASS;
    };
    let ip = ip as *mut u8;
    let new_dst = cfg.vm_addr;
    // SAFETY: the fixed header was bounds-checked above.
    let (proto, frag) = unsafe { (*ip.add(9), u16::from_be(ld16(ip.add(6))) & 0x1fff) };
    // The transport header must be whole before anything is rewritten.
    let l4_need = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => 0,
    };
    if frag == 0 && tot_len < ihl + l4_need {
        count(stat::BAD_HEADER);
        return xdp_action::XDP_DROP;
    }
    // SAFETY: the fixed header was bounds-checked above.
    unsafe {
        // TTL - 1 and the new destination, both covered by the header checksum.
        let old_ttl_proto = ld16(ip.add(8));
        *ip.add(8) -= 1;
        let new_ttl_proto = ld16(ip.add(8));
        let mut check = ld16(ip.add(10));
        check = csum::replace2(check, old_ttl_proto, new_ttl_proto);
        check = csum::replace4(check, dst, new_dst);
        st16(ip.add(10), check);
        st32(ip.add(16), new_dst);
        // The pseudo-header in TCP/UDP checksums covers the destination too; only the
        // first fragment carries the transport header.
        if frag == 0 {
            let l4 = ETH_HLEN + (ihl & 0x3c);
            if proto == IPPROTO_TCP {
                let Some(th) = xptr::<[u8; 20]>(ctx, l4) else {
                    count(stat::BAD_HEADER);
                    return xdp_action::XDP_DROP;
                };
                let c = (th as *mut u8).add(16);
                st16(c, csum::replace4(ld16(c), dst, new_dst));
            } else if proto == IPPROTO_UDP {
                let Some(uh) = xptr::<[u8; 8]>(ctx, l4) else {
                    count(stat::BAD_HEADER);
                    return xdp_action::XDP_DROP;
                };
                let c = (uh as *mut u8).add(6);
                let old = ld16(c);
                if old != 0 {
                    st16(c, csum::udp_fixup(csum::replace4(old, dst, new_dst)));
                }
            }
        }
    }
    let Some(eth) = xptr::<[u8; ETH_HLEN]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds-checked above.
    set_macs(eth as *mut u8, &vm.vm_mac, &vm.port_mac);
    if let Some(c) = vm_counters(vm.slot) {
        // SAFETY: per-CPU value, only this CPU writes it now.
        unsafe {
            (*c).rx_packets += 1;
            (*c).rx_bytes += tot_len as u64;
        }
    }
    let v = BOXD_DEVMAP
        .redirect(vm.port_ifindex, xdp_action::XDP_DROP as u64)
        .unwrap_or(xdp_action::XDP_DROP);
    if v == xdp_action::XDP_REDIRECT {
        count(stat::ROUTER_LOCAL);
    } else {
        count(stat::REDIRECT_FAILED);
    }
    v
}

/// Encapsulates (IPIP) toward the node that runs the VM.
#[inline(always)]
fn encap(ctx: &XdpContext, cfg: &Config, vm: &VmEntry, tot_len: usize) -> u32 {
    // SAFETY: a map value; copied out at once.
    let Some(node) = (unsafe { BOXD_NODES.get(vm.node) }).copied() else {
        count(stat::NO_NODE);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: grows headroom; every packet pointer is re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -20) } != 0 {
        count(stat::BAD_HEADER);
        return xdp_action::XDP_DROP;
    }
    let Some(h) = xptr::<[u8; ETH_HLEN + 20 + ETH_HLEN]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    let h = h as *mut u8;
    let outer_len = (tot_len + 20) as u16;
    // SAFETY: 48 bytes bounds-checked above; the old Ethernet header is at 20..34.
    unsafe {
        for i in 0..ETH_HLEN {
            *h.add(i) = *h.add(20 + i);
        }
        let ip = h.add(ETH_HLEN);
        let hdr: [u8; 12] = [
            0x45,
            0,
            (outer_len >> 8) as u8,
            outer_len as u8,
            0,
            0,
            0,
            0,
            64,
            IPPROTO_IPIP,
            0,
            0,
        ];
        for (i, b) in hdr.iter().enumerate() {
            *ip.add(i) = *b;
        }
        st32(ip.add(12), cfg.node_addr);
        st32(ip.add(16), node.addr);
        let mut s: u64 = 0;
        for i in 0..10 {
            s += ld16(ip.add(i * 2)) as u64;
        }
        st16(ip.add(10), !csum::fold(s));
    }
    count(stat::ROUTER_ENCAP);
    let v = send(ctx, cfg.node_addr, node.addr, tot_len + 20, true);
    if v != xdp_action::XDP_PASS || node.ifindex == 0 {
        return v;
    }
    // The FIB has no neighbour for the node right now; the kernel would drop the
    // encapsulated packet (its source is a local address), so use the neighbour the
    // reconciler resolved.
    let Some(eth) = xptr::<[u8; ETH_HLEN]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    set_macs(eth as *mut u8, &node.dmac, &node.smac);
    count(stat::ENCAP_STATIC_NEIGH);
    // SAFETY: as above.
    if node.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        return xdp_action::XDP_TX;
    }
    // SAFETY: a helper taking plain integers.
    unsafe { bpf_redirect(node.ifindex, 0) as u32 }
}

/// The kernel's FIB lookup for an IPv4 packet from `src` to `dst` arriving on `ifindex`
/// (XDP and TC alike): the return code and the filled-in request (egress ifindex, MACs).
#[inline(always)]
fn fib(
    ctx: *mut core::ffi::c_void,
    ifindex: u32,
    src: u32,
    dst: u32,
    tot_len: u16,
    l4: u8,
) -> (u32, bpf_fib_lookup) {
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = l4;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ifindex;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: the helper reads and writes `p`, a stack struct of the size given, with
    // the program's own context.
    let rc = unsafe { fib_lookup(ctx, &mut p as *mut _, size_of::<bpf_fib_lookup>() as i32, 0) };
    (rc as u32, p)
}

/// Sends the IPv4 packet in the frame out of the interface the FIB picks, or leaves
/// it to the kernel when the FIB cannot resolve the next hop yet.
#[inline(always)]
fn send(ctx: &XdpContext, src: u32, dst: u32, tot_len: usize, encapsulated: bool) -> u32 {
    // SAFETY: reading the ingress ifindex from the context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let l4 = if encapsulated { IPPROTO_IPIP } else { 0 };
    let (rc, p) = fib(ctx.as_ptr(), ifindex, src, dst, tot_len as u16, l4);
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        // No neighbour entry yet (or no route): the kernel resolves it.
        return xdp_action::XDP_PASS;
    }
    let Some(eth) = xptr::<[u8; ETH_HLEN]>(ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    set_macs(eth as *mut u8, &p.dmac, &p.smac);
    if p.ifindex == ifindex {
        return xdp_action::XDP_TX;
    }
    // SAFETY: a helper taking plain integers.
    unsafe { bpf_redirect(p.ifindex, 0) as u32 }
}

/// A VM's packet that came back from a worker: out through the uplink.
#[inline(always)]
fn forward(ctx: &XdpContext, src: u32, dst: u32) -> u32 {
    let Some(ip) = xptr::<[u8; 20]>(ctx, ETH_HLEN) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: bounds-checked above.
    let tot_len = u16::from_be(ld16(unsafe { (ip as *const u8).add(2) })) as usize;
    send(ctx, src, dst, tot_len, false)
}

/// Strips an outer IPv4 header (IPIP): the Ethernet header moves up over it.
#[inline(always)]
fn decap(ctx: &XdpContext) -> bool {
    let Some(h) = xptr::<[u8; ETH_HLEN + 20 + 20]>(ctx, 0) else {
        return false;
    };
    let h = h as *mut u8;
    // SAFETY: 54 bytes bounds-checked above (outer and inner fixed headers present).
    unsafe {
        if *h.add(ETH_HLEN + 20) >> 4 != 4 {
            return false;
        }
        for i in (0..ETH_HLEN).rev() {
            *h.add(20 + i) = *h.add(i);
        }
    }
    // SAFETY: shrinks the headroom by the outer header; pointers are re-derived after.
    unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, 20) == 0 }
}

/// Answers ARP requests for public addresses this edge owns with the uplink's MAC.
#[inline(always)]
fn arp(ctx: &XdpContext, cfg: &Config) -> u32 {
    if cfg.flags & CFG_EDGE == 0 {
        return xdp_action::XDP_PASS;
    }
    let Some(p) = xptr::<[u8; ETH_HLEN + 28]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let p = p as *mut u8;
    // SAFETY: 42 bytes bounds-checked above.
    unsafe {
        let a = p.add(ETH_HLEN);
        // Ethernet/IPv4, 6/4 address sizes, request.
        if ld16(a) != 0x0100 || ld16(a.add(2)) != 0x0008 || *a.add(4) != 6 || *a.add(5) != 4 {
            return xdp_action::XDP_PASS;
        }
        if u16::from_be(ld16(a.add(6))) != 1 {
            return xdp_action::XDP_PASS;
        }
        let tpa = ld32(a.add(24));
        if BOXD_VMS.get_ptr(tpa).is_none() {
            return xdp_action::XDP_PASS;
        }
        let spa = ld32(a.add(14));
        let mut sha = [0u8; 6];
        for i in 0..6 {
            sha[i] = *a.add(8 + i);
        }
        // Reply: op 2, sender = us with the public address, target = the asker.
        st16(a.add(6), 2u16.to_be());
        for i in 0..6 {
            *a.add(8 + i) = cfg.uplink_mac[i];
            *a.add(18 + i) = sha[i];
            *p.add(i) = sha[i];
            *p.add(6 + i) = cfg.uplink_mac[i];
        }
        st32(a.add(14), tpa);
        st32(a.add(24), spa);
    }
    count(stat::ARP_REPLIES);
    xdp_action::XDP_TX
}

// ---------------------------------------------------------------------------------
// The SNI parser.

#[xdp]
pub fn boxd_sni(ctx: XdpContext) -> u32 {
    sni_parse(&ctx);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn sni_parse(ctx: &XdpContext) {
    let Some(ip) = xptr::<[u8; 20]>(ctx, ETH_HLEN) else {
        return;
    };
    let ip = ip as *const u8;
    // SAFETY: bounds-checked above.
    let (vihl, proto, tot_len, saddr, daddr) = unsafe {
        (
            *ip,
            *ip.add(9),
            u16::from_be(ld16(ip.add(2))) as usize,
            ld32(ip.add(12)),
            ld32(ip.add(16)),
        )
    };
    if vihl >> 4 != 4 || proto != IPPROTO_TCP {
        return;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return;
    }
    let l4 = ETH_HLEN + (ihl & 0x3c);
    let Some(th) = xptr::<[u8; 20]>(ctx, l4) else {
        return;
    };
    let th = th as *const u8;
    // SAFETY: bounds-checked above.
    let (sport, dport, seq, doff) = unsafe {
        (
            ld16(th),
            ld16(th.add(2)),
            u32::from_be(ld32(th.add(4))),
            ((*th.add(12) >> 4) as usize) * 4,
        )
    };
    if doff < 20 || tot_len < ihl + doff {
        return;
    }
    let payload_len = tot_len - ihl - doff;
    if payload_len == 0 {
        return;
    }
    let payload_off = l4 + doff;
    let key = FlowKey {
        saddr,
        daddr,
        sport,
        dport,
    };
    let (Some(buf), Some(flow)) = (SNI_SCRATCH.get_ptr_mut(0), SNI_FLOW_SCRATCH.get_ptr_mut(0))
    else {
        return;
    };
    // SAFETY: per-CPU scratch values owned by this run; the saved flow is copied out.
    let (buf, flow) = unsafe { (&mut *buf, &mut *flow) };
    let resumed = match BOXD_SNI_FLOWS.get_ptr(key) {
        Some(saved) => {
            // SAFETY: a map value, copied at once.
            *flow = unsafe { *saved };
            if flow.next_seq != seq {
                let _ = BOXD_SNI_FLOWS.remove(key);
                count(stat::SNI_FALLBACK);
                return;
            }
            true
        }
        None => {
            // Cheap test first: a TLS handshake record starts with 22.
            let mut first = 0u8;
            // SAFETY: the helper writes one byte into `first`; it checks the packet side.
            let rc = unsafe {
                bpf_xdp_load_bytes(
                    ctx.as_ptr() as *mut _,
                    payload_off as u32,
                    &mut first as *mut u8 as *mut _,
                    1,
                )
            };
            if rc != 0 || first != 22 {
                return;
            }
            flow.segments = 0;
            flow.carry_len = 0;
            flow.skip = 0;
            flow.ext_left = 0;
            false
        }
    };
    let carry = if resumed {
        sni::load_carry(flow, buf)
    } else {
        0
    };
    let n = if payload_len > sni::PAYLOAD_MAX {
        sni::PAYLOAD_MAX
    } else {
        payload_len
    };
    // Said again right at the call, behind a barrier the optimiser cannot see through:
    // the verifier needs 1 <= n <= PAYLOAD_MAX on this very register.
    let n = core::hint::black_box(n);
    if n == 0 || n > sni::PAYLOAD_MAX || carry > common::CARRY_MAX {
        return;
    }
    // SAFETY: `carry` <= CARRY_MAX and `n` <= PAYLOAD_MAX, so the copy stays inside the
    // SCRATCH-byte per-CPU buffer; the helper checks the packet side.
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.as_ptr() as *mut _,
            payload_off as u32,
            buf.as_mut_ptr().add(carry) as *mut _,
            n as u32,
        )
    };
    if rc != 0 {
        if resumed {
            let _ = BOXD_SNI_FLOWS.remove(key);
        }
        count(stat::SNI_FALLBACK);
        return;
    }
    match sni::step(flow, resumed, buf, carry, n, seq, n < payload_len) {
        sni::Step::Found { hash, .. } => {
            let segment = flow.segments as u32 + 1;
            if resumed {
                let _ = BOXD_SNI_FLOWS.remove(key);
                count(stat::SNI_FOUND_LATER);
            }
            count(stat::SNI_FOUND);
            steer(key, hash, segment);
        }
        sni::Step::Save => {
            if BOXD_SNI_FLOWS.insert(key, *flow, 0).is_ok() {
                count(stat::SNI_CARRIED);
            } else {
                count(stat::SNI_FALLBACK);
            }
        }
        sni::Step::Fail(_) => {
            if resumed {
                let _ = BOXD_SNI_FLOWS.remove(key);
            }
            count(stat::SNI_FALLBACK);
        }
    }
}

/// Records which VM (and node) a connection is for, and wakes the VM if it sleeps.
#[inline(always)]
fn steer(key: FlowKey, hash: u64, segment: u32) {
    // SAFETY: map values, copied at once.
    let Some(addr) = (unsafe { BOXD_DOMAINS.get(hash) }).map(|d| d.public_addr) else {
        count(stat::SNI_UNKNOWN);
        return;
    };
    // SAFETY: as above.
    let Some(vm) = (unsafe { BOXD_VMS.get(addr) }).copied() else {
        count(stat::SNI_UNKNOWN);
        return;
    };
    let _ = BOXD_STEER.insert(
        key,
        Steer {
            public_addr: addr,
            node: vm.node,
            vm_id: vm.vm_id,
            segment,
            name_hash: hash,
        },
        0,
    );
    if vm.state != VM_RUNNING
        && let Some(cfg) = BOXD_CONFIG.get(0)
    {
        wake(cfg, addr, &vm, WAKE_SNI);
    }
}

// ---------------------------------------------------------------------------------
// The VM side.

#[classifier]
pub fn boxd_vm(ctx: TcContext) -> i32 {
    vm_side(&ctx)
}

#[inline(always)]
fn vm_side(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a map value, copied at once.
    let Some(port) = (unsafe { BOXD_PORTS.get(ifindex) }).copied() else {
        return TC_ACT_OK as i32;
    };
    let Some(cfg) = BOXD_CONFIG.get(0) else {
        return TC_ACT_OK as i32;
    };
    let cfg = *cfg;
    let Ok(proto) = ctx.load::<u16>(12) else {
        return TC_ACT_SHOT as i32;
    };
    match u16::from_be(proto) {
        ETH_P_IP => {}
        ETH_P_ARP => return TC_ACT_OK as i32,
        _ => {
            count(stat::VM_ETHERTYPE);
            return TC_ACT_SHOT as i32;
        }
    }
    let Ok(hdr) = ctx.load::<[u8; 20]>(ETH_HLEN) else {
        count(stat::BAD_HEADER);
        return TC_ACT_SHOT as i32;
    };
    let src = u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let dst = u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]);
    let addr = port.public_addr;
    if hdr[0] >> 4 != 4 || src != cfg.vm_addr {
        count(stat::VM_SPOOFED);
        if let Some(c) = vm_counters(port.slot) {
            // SAFETY: per-CPU value, only this CPU writes it now.
            unsafe { (*c).spoofed += 1 };
        }
        return TC_ACT_SHOT as i32;
    }
    if dst == cfg.gw_addr {
        count(stat::VM_TO_HOST);
        return TC_ACT_OK as i32;
    }
    let len = ctx.len() as u64;
    if !rate_ok(addr, len) {
        count(stat::VM_RATE_DROPPED);
        if let Some(c) = vm_counters(port.slot) {
            // SAFETY: as above.
            unsafe { (*c).rate_dropped += 1 };
        }
        return TC_ACT_SHOT as i32;
    }
    // SNAT: the source becomes the VM's public address, in the IP header and in the
    // TCP/UDP pseudo-header (the helpers keep offloaded checksums right).
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let proto = hdr[9];
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    let l4 = ETH_HLEN + (ihl & 0x3c);
    if frag == 0 {
        if proto == IPPROTO_TCP {
            if ctx
                .l4_csum_replace(
                    l4 + 16,
                    src as u64,
                    addr as u64,
                    (BPF_F_PSEUDO_HDR | 4) as u64,
                )
                .is_err()
            {
                count(stat::BAD_HEADER);
                return TC_ACT_SHOT as i32;
            }
        } else if proto == IPPROTO_UDP {
            let Ok(c) = ctx.load::<u16>(l4 + 6) else {
                count(stat::BAD_HEADER);
                return TC_ACT_SHOT as i32;
            };
            if c != 0
                && ctx
                    .l4_csum_replace(
                        l4 + 6,
                        src as u64,
                        addr as u64,
                        (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4) as u64,
                    )
                    .is_err()
            {
                count(stat::BAD_HEADER);
                return TC_ACT_SHOT as i32;
            }
        }
    }
    if ctx
        .l3_csum_replace(ETH_HLEN + 10, src as u64, addr as u64, 4)
        .is_err()
        || ctx.store(ETH_HLEN + 12, &addr, 0).is_err()
    {
        count(stat::BAD_HEADER);
        return TC_ACT_SHOT as i32;
    }
    if let Some(c) = vm_counters(port.slot) {
        // SAFETY: per-CPU value, only this CPU writes it now.
        unsafe {
            (*c).tx_packets += 1;
            (*c).tx_bytes += len;
        }
    }
    if cfg.flags & CFG_EDGE != 0 {
        count(stat::VM_FORWARDED);
        return tc_send(
            ctx,
            ifindex,
            addr,
            dst,
            u16::from_be_bytes([hdr[2], hdr[3]]),
            0,
        );
    }
    // A worker: to the edge node, encapsulated.
    // SAFETY: a map value, copied at once.
    let Some(edge) = (unsafe { BOXD_NODES.get(cfg.edge_node) }).copied() else {
        count(stat::NO_NODE);
        return TC_ACT_SHOT as i32;
    };
    let inner_len = u16::from_be_bytes([hdr[2], hdr[3]]);
    if ctx
        .adjust_room(20, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64)
        .is_err()
    {
        count(stat::BAD_HEADER);
        return TC_ACT_SHOT as i32;
    }
    let outer_len = inner_len.wrapping_add(20);
    let mut outer: [u8; 20] = [
        0x45,
        0,
        (outer_len >> 8) as u8,
        outer_len as u8,
        0,
        0,
        0,
        0,
        64,
        IPPROTO_IPIP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    outer[12..16].copy_from_slice(&cfg.node_addr.to_ne_bytes());
    outer[16..20].copy_from_slice(&edge.addr.to_ne_bytes());
    let mut s: u64 = 0;
    for i in 0..10 {
        s += u16::from_ne_bytes([outer[2 * i], outer[2 * i + 1]]) as u64;
    }
    let c = !csum::fold(s);
    outer[10..12].copy_from_slice(&c.to_ne_bytes());
    if ctx.store(ETH_HLEN, &outer, 0).is_err() {
        count(stat::BAD_HEADER);
        return TC_ACT_SHOT as i32;
    }
    count(stat::VM_ENCAP);
    tc_send(
        ctx,
        ifindex,
        cfg.node_addr,
        edge.addr,
        outer_len,
        IPPROTO_IPIP,
    )
}

/// Token bucket: whether `len` bytes may go now.
#[inline(always)]
fn rate_ok(addr: u32, len: u64) -> bool {
    let Some(r) = BOXD_RATE.get_ptr_mut(addr) else {
        return true;
    };
    // SAFETY: a map value that lives while the program runs; concurrent CPUs may race
    // on the refill, which at worst lets a few extra bytes through.
    unsafe {
        let r = &mut *r;
        if r.bytes_per_s == 0 {
            return true;
        }
        let now = bpf_ktime_get_ns();
        let elapsed = now.wrapping_sub(r.last_ns);
        // Refill; capped at 1 s of elapsed time so the product cannot overflow.
        let elapsed = if elapsed > 1_000_000_000 {
            1_000_000_000
        } else {
            elapsed
        };
        let mut tokens = r.tokens + r.bytes_per_s * elapsed / 1_000_000_000;
        if tokens > r.burst {
            tokens = r.burst;
        }
        r.last_ns = now;
        if tokens < len {
            r.tokens = tokens;
            return false;
        }
        r.tokens = tokens - len;
        true
    }
}

/// Sends the (rewritten) packet on: straight out of the interface the FIB picks, with
/// the neighbour resolved by the kernel when needed; or up the stack if no route.
#[inline(always)]
fn tc_send(ctx: &TcContext, ifindex: u32, src: u32, dst: u32, tot_len: u16, l4: u8) -> i32 {
    let (rc, p) = fib(ctx.as_ptr(), ifindex, src, dst, tot_len, l4);
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&p.dmac);
        macs[6..].copy_from_slice(&p.smac);
        if ctx.store(0, &macs, 0).is_err() {
            return TC_ACT_SHOT as i32;
        }
        // SAFETY: a helper taking plain integers.
        return unsafe { bpf_redirect(p.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // SAFETY: no next-hop parameters: the helper does its own lookup.
        return unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    TC_ACT_OK as i32
}

#[xdp]
pub fn boxd_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The benchmark's packet generator (`cargo xtask bench bpf`), run with BPF_PROG_RUN's
/// live-frames mode: rewrites the frame from BOXD_GEN (live frames are recycled pages
/// that keep whatever the receiver wrote into them) and sends it out.
#[xdp]
pub fn boxd_tx(ctx: XdpContext) -> u32 {
    let (Some(t), Some(p)) = (BOXD_GEN.get(0), xptr::<[u8; 64]>(&ctx, 0)) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: 64 bounds-checked bytes of packet, 64 bytes of map value.
    unsafe { *p = *t };
    xdp_action::XDP_TX
}

/// The generator's frame (64 bytes).
#[map]
static BOXD_GEN: Array<[u8; 64]> = Array::with_max_entries(1, 0);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
