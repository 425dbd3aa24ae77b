//! boxd's eBPF data path from userspace: load the programs built from `ebpf/`, pin them
//! and their maps under a bpffs directory, attach them (XDP on the uplink and the
//! private interface, TC on every VM's host port) through pinned links that outlive
//! this process, program the maps from a desired state by diff, read them back as
//! typed tables, and stream wake events.
//!
//! Restarting boxd never detaches anything: `up` on an existing pin directory reuses
//! the pinned maps (their contents survive) and swaps the programs inside the pinned
//! links atomically (BPF_LINK_UPDATE), so traffic keeps flowing throughout.

pub mod desired;
pub mod events;
pub mod netdev;
pub mod tables;

pub use boxd_ebpf_common as common;

use aya::maps::{Array, MapData, MapInfo, ProgramArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::xdp::XdpLink;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use common::{Config, maps, progs};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The eBPF object, built by build.rs from ebpf/programs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/boxd-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DpError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "the data path is not set up in {0} (no pinned maps there): run `boxd bpf up --uplink IFACE` first"
    )]
    NotUp(PathBuf),
    #[error(
        "pinned map {name} in {dir} was made by a different boxd version ({what}); \
         `boxd bpf down` then `boxd bpf up` replaces it (the reconciler restores its entries)"
    )]
    Incompatible {
        name: String,
        dir: PathBuf,
        what: String,
    },
    #[error("network interface {0:?} does not exist (check `ip link`)")]
    NoInterface(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Bpf { what: String, detail: String },
}

pub type Result<T> = std::result::Result<T, DpError>;

/// Wraps an aya (or any displayable) error with what we were doing.
pub(crate) fn bpf_err(what: impl Into<String>) -> impl FnOnce(String) -> DpError {
    let what = what.into();
    move |detail| DpError::Bpf { what, detail }
}

/// Formats an error with its whole source chain (aya's top-level messages are terse:
/// the verifier log or the errno is in the chain).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DpError {
    let what = what.into();
    move |source| DpError::Io { what, source }
}

/// What a node's data path is configured with (`boxd bpf up`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id in the cluster (1 for a single node).
    pub node_id: u32,
    /// This node's private address (encapsulated traffic); unset on a single node.
    pub node_addr: Option<Ipv4Addr>,
    /// The VM side of every VM's link.
    pub vm_addr: Ipv4Addr,
    /// The host side of every VM's link.
    pub gw_addr: Ipv4Addr,
    /// Whether this node has the uplink (owns public addresses).
    pub edge: bool,
    /// The edge node a worker sends its VMs' traffic out through.
    pub edge_node: u32,
    /// Least time between two wake events for one VM.
    pub wake_interval_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: 1,
            node_addr: None,
            vm_addr: Ipv4Addr::new(10, 0, 0, 2),
            gw_addr: Ipv4Addr::new(10, 0, 0, 1),
            edge: true,
            edge_node: 1,
            wake_interval_ms: 1000,
        }
    }
}

impl NodeConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DpError::Invalid(m));
        if self.node_id == 0 {
            return bad("node id 0 is reserved: use 1 or more".into());
        }
        if self.vm_addr == self.gw_addr {
            return bad(format!(
                "the VM link address and the host link address are both {}",
                self.vm_addr
            ));
        }
        for (what, a) in [("VM link", self.vm_addr), ("host link", self.gw_addr)] {
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                return bad(format!("{what} address {a} cannot be a host's address"));
            }
        }
        if !self.edge && self.node_addr.is_none() {
            return bad(
                "a node without the uplink (--no-edge) needs --node-addr, its private address, \
                 to encapsulate its VMs' traffic to the edge"
                    .into(),
            );
        }
        if !self.edge && self.edge_node == self.node_id {
            return bad(format!(
                "node {} is not an edge, so --edge-node must name another node",
                self.node_id
            ));
        }
        if self.wake_interval_ms == 0 || self.wake_interval_ms > 60_000 {
            return bad(format!(
                "wake interval {} ms is out of range (1..=60000)",
                self.wake_interval_ms
            ));
        }
        Ok(())
    }

    fn to_map(&self, uplink_mac: [u8; 6]) -> Config {
        Config {
            node_id: self.node_id,
            node_addr: self.node_addr.map_or(0, addr_key),
            vm_addr: addr_key(self.vm_addr),
            gw_addr: addr_key(self.gw_addr),
            flags: if self.edge { common::CFG_EDGE } else { 0 },
            edge_node: self.edge_node,
            wake_interval_ns: self.wake_interval_ms * 1_000_000,
            uplink_mac,
            _pad: [0; 2],
        }
    }

    pub(crate) fn from_map(c: &Config) -> Self {
        Self {
            node_id: c.node_id,
            node_addr: (c.node_addr != 0).then(|| key_addr(c.node_addr)),
            vm_addr: key_addr(c.vm_addr),
            gw_addr: key_addr(c.gw_addr),
            edge: c.flags & common::CFG_EDGE != 0,
            edge_node: c.edge_node,
            wake_interval_ms: c.wake_interval_ns / 1_000_000,
        }
    }
}

/// An IPv4 address as the maps hold it (network-order bytes read natively).
pub fn addr_key(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

pub fn key_addr(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(k.to_ne_bytes())
}

/// The calling thread's network namespace (its inode number).
pub fn netns_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino())
}

/// Where things live under the pin directory.
#[derive(Debug, Clone)]
pub struct PinDir(pub PathBuf);

impl Default for PinDir {
    fn default() -> Self {
        Self(PathBuf::from(common::DEFAULT_PIN_DIR))
    }
}

impl PinDir {
    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    pub fn prog(&self, name: &str) -> PathBuf {
        self.0.join("progs").join(name)
    }
    pub fn links(&self) -> PathBuf {
        self.0.join("links")
    }
    /// A link's pin: `<kind>-<netns inode>-<ifindex>`. Interface indexes are per network
    /// namespace, so the namespace is part of the name (one pin directory can hold links
    /// of several namespaces: the test topologies do).
    pub fn link(&self, kind: &str, ifindex: u32) -> PathBuf {
        self.links()
            .join(format!("{kind}-{}-{ifindex}", netns_id()))
    }
    pub fn xdp_link(&self, ifindex: u32) -> PathBuf {
        self.link("xdp", ifindex)
    }
    pub fn tc_link(&self, ifindex: u32) -> PathBuf {
        self.link("tc", ifindex)
    }
    /// The marker of a port whose VM program is a netlink (clsact) filter: kernels
    /// without TCX.
    pub fn tc_netlink(&self, ifindex: u32) -> PathBuf {
        self.link("tcnl", ifindex)
    }
    /// Whether `up` has run here (the config map is pinned).
    pub fn is_up(&self) -> bool {
        self.map(maps::CONFIG).exists()
    }
    pub fn require_up(&self) -> Result<()> {
        if self.is_up() {
            Ok(())
        } else {
            Err(DpError::NotUp(self.0.clone()))
        }
    }
}

/// What `up` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct UpOptions {
    pub pin: PinDir,
    pub config: NodeConfig,
    /// Interfaces the router runs on: the uplink first (its MAC answers ARP), then the
    /// private interface between nodes if it is another one.
    pub interfaces: Vec<String>,
    /// Allow generic (skb) XDP when the driver has no native XDP.
    pub allow_generic: bool,
}

/// What `up` did, for the operator.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpReport {
    pub pin_dir: PathBuf,
    pub config: NodeConfig,
    /// "attached", "replaced" (atomically, in an existing link) per interface.
    pub router: Vec<Attachment>,
    /// VM ports whose TC program was replaced in place.
    pub ports_replaced: usize,
    pub maps_reused: usize,
    pub maps_created: usize,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Attachment {
    pub interface: String,
    pub ifindex: u32,
    pub action: String,
    pub mode: String,
}

/// Map definitions the object carries: (name, key size, value size, max entries).
/// Checked against pinned maps before they are reused.
fn expected_maps() -> Vec<(&'static str, u32, u32, u32)> {
    use common::*;
    use std::mem::size_of;
    let s = |n: usize| n as u32;
    vec![
        (maps::CONFIG, 4, s(size_of::<Config>()), 1),
        (maps::VMS, 4, s(size_of::<VmEntry>()), MAX_VMS),
        (maps::PORTS, 4, s(size_of::<PortEntry>()), MAX_PORTS),
        (maps::NODES, 4, s(size_of::<NodeEntry>()), MAX_NODES),
        (maps::DOMAINS, 8, s(size_of::<DomainEntry>()), MAX_DOMAINS),
        (maps::PROXIES, 4, 4, MAX_PROXIES),
        (
            maps::VM_STATS,
            4,
            s(size_of::<VmCounters>()),
            MAX_LOCAL_VMS + 1,
        ),
        (maps::RATE, 4, s(size_of::<RateLimit>()), MAX_VMS),
        (maps::STATS, 4, 8, stat::COUNT),
        (maps::WAKE_LAST, 4, 8, MAX_VMS),
        (maps::EVENTS, 0, 0, EVENTS_BYTES),
        (
            maps::SNI_FLOWS,
            s(size_of::<FlowKey>()),
            s(size_of::<SniFlow>()),
            MAX_SNI_FLOWS,
        ),
        (
            maps::STEER,
            s(size_of::<FlowKey>()),
            s(size_of::<Steer>()),
            MAX_STEER,
        ),
        (maps::JUMP, 4, 4, 4),
        (maps::DEVMAP, 4, 8, MAX_PORTS),
    ]
}

/// Refuses pinned maps whose layout differs from this build's.
fn check_pinned(pin: &PinDir) -> Result<(usize, usize)> {
    let (mut reused, mut created) = (0, 0);
    for (name, key, value, max) in expected_maps() {
        let path = pin.map(name);
        if !path.exists() {
            created += 1;
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| DpError::Bpf {
            what: format!("reading pinned map {}", path.display()),
            detail: chain(&e),
        })?;
        let got = (info.key_size(), info.value_size(), info.max_entries());
        // A devmap's value is 4 or 8 bytes depending on the kernel.
        let value_ok = got.1 == value || (name == maps::DEVMAP && got.1 == 4);
        if got.0 != key || !value_ok || got.2 != max {
            return Err(DpError::Incompatible {
                name: name.into(),
                dir: pin.0.clone(),
                what: format!(
                    "key/value/max {}/{}/{}, this build expects {key}/{value}/{max}",
                    got.0, got.1, got.2
                ),
            });
        }
        reused += 1;
    }
    Ok((reused, created))
}

/// Mounts bpffs on /sys/fs/bpf when nothing is mounted there.
pub fn ensure_bpffs(pin: &PinDir) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = Path::new("/sys/fs/bpf");
    if !pin.0.starts_with(root) {
        return Ok(());
    }
    let c = std::ffi::CString::new("/sys/fs/bpf").expect("static path");
    // SAFETY: statfs fills the zeroed struct we own; the path is NUL-terminated.
    let magic = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return Err(io_err("statfs /sys/fs/bpf")(std::io::Error::last_os_error()));
        }
        st.f_type
    };
    if magic == BPF_FS_MAGIC {
        return Ok(());
    }
    let bpf = std::ffi::CString::new("bpf").expect("static");
    // SAFETY: mount(2) with NUL-terminated strings and no data.
    let rc = unsafe { libc::mount(bpf.as_ptr(), c.as_ptr(), bpf.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(io_err("mount -t bpf bpf /sys/fs/bpf")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Loads the object with its maps pinned in (or reused from) the pin directory; every
/// program must pass the verifier.
pub fn load(pin: &PinDir) -> Result<Ebpf> {
    let (ebpf, sni) = load_degraded(pin)?;
    match sni {
        None => Ok(ebpf),
        Some(e) => Err(e),
    }
}

/// Like [`load`], but a kernel whose verifier rejects the SNI parser (Linux 6.1 tracks
/// too little about register-to-register bounds for it) still gets the router, the VM
/// program and the rest: the router's tail call then finds no parser and passes HTTPS
/// to the proxy untouched (no SNI wake-up, no steering). Returns why SNI is off.
pub fn load_degraded(pin: &PinDir) -> Result<(Ebpf, Option<DpError>)> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&pin.0);
    let mut ebpf = loader.load(OBJECT).map_err(|e| DpError::Bpf {
        what: "loading the eBPF object".into(),
        detail: chain(&e),
    })?;
    for name in [progs::ROUTER, progs::PASS, progs::TX] {
        let p: &mut Xdp = prog_mut(&mut ebpf, name)?;
        p.load().map_err(|e| DpError::Bpf {
            what: format!("verifying {name}"),
            detail: chain(&e),
        })?;
    }
    let p: &mut SchedClassifier = prog_mut(&mut ebpf, progs::VM_EGRESS)?;
    p.load().map_err(|e| DpError::Bpf {
        what: format!("verifying {}", progs::VM_EGRESS),
        detail: chain(&e),
    })?;
    let sni: &mut Xdp = prog_mut(&mut ebpf, progs::SNI)?;
    if let Err(e) = sni.load() {
        return Ok((
            ebpf,
            Some(DpError::Bpf {
                what: format!("verifying {}", progs::SNI),
                detail: chain(&e),
            }),
        ));
    }
    // The router tail-calls the SNI parser.
    let sni_fd = prog_mut::<Xdp>(&mut ebpf, progs::SNI)?
        .fd()
        .map_err(|e| bpf_err("SNI program fd")(chain(&e)))?
        .try_clone()
        .map_err(|e| bpf_err("SNI program fd")(e.to_string()))?;
    let mut jump: ProgramArray<_> = ProgramArray::try_from(
        ebpf.map_mut(maps::JUMP)
            .ok_or_else(|| bpf_err("the object")(format!("no map {}", maps::JUMP)))?,
    )
    .map_err(|e| bpf_err("tail-call map")(chain(&e)))?;
    jump.set(common::JUMP_SNI, &sni_fd, 0)
        .map_err(|e| bpf_err("installing the SNI parser in the tail-call map")(chain(&e)))?;
    Ok((ebpf, None))
}

pub(crate) fn prog_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| bpf_err("the eBPF object")(format!("has no program {name}")))?;
    p.try_into()
        .map_err(|e: aya::programs::ProgramError| bpf_err(format!("program {name}"))(chain(&e)))
}

/// Loads, pins and attaches everything; idempotent, and atomic for running traffic.
pub fn up(opts: &UpOptions) -> Result<UpReport> {
    opts.config.validate()?;
    if opts.interfaces.is_empty() {
        return Err(DpError::Invalid(
            "no interface to run the router on: give --uplink IFACE (and --private IFACE \
             between nodes)"
                .into(),
        ));
    }
    let mut ifaces = Vec::new();
    for name in &opts.interfaces {
        let ifindex = netdev::ifindex(name)?;
        if ifaces.iter().any(|(_, i)| *i == ifindex) {
            continue;
        }
        ifaces.push((name.clone(), ifindex));
    }
    let uplink_mac = netdev::mac(&ifaces[0].0)?;
    let mut warnings = Vec::new();
    if let [(up, _), (private, _)] = &ifaces[..] {
        let (mu, mp) = (netdev::mtu(up)?, netdev::mtu(private)?);
        if mp < mu + 20 {
            warnings.push(format!(
                "the private interface {private} (MTU {mp}) cannot carry full-size packets                  of the uplink {up} (MTU {mu}) plus the 20-byte encapsulation: set its MTU                  to at least {}",
                mu + 20
            ));
        }
    }
    let pin = &opts.pin;
    ensure_bpffs(pin)?;
    let (maps_reused, maps_created) = check_pinned(pin)?;
    for d in [pin.0.clone(), pin.links(), pin.0.join("progs")] {
        std::fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
    }
    let (mut ebpf, sni_off) = load_degraded(pin)?;
    if let Some(e) = &sni_off {
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default().to_string();
        warnings.push(format!(
            "this kernel's verifier rejects the SNI parser ({first}): HTTPS steering by SNI and \
             wake-up on a ClientHello are off; routing, NAT and wake-on-traffic work (Linux 6.6 or newer has both)"
        ));
    }

    // Configuration before attaching: a router without it passes everything.
    let mut config: Array<_, Config> = Array::try_from(
        ebpf.map_mut(maps::CONFIG)
            .ok_or_else(|| bpf_err("the object")(format!("no map {}", maps::CONFIG)))?,
    )
    .map_err(|e| bpf_err("config map")(chain(&e)))?;
    config
        .set(0, opts.config.to_map(uplink_mac), 0)
        .map_err(|e| bpf_err("writing the config map")(chain(&e)))?;

    // Programs are pinned so later commands (the reconciler attaching a new VM port)
    // use the same verified programs without loading the object again.
    for name in [progs::ROUTER, progs::SNI, progs::PASS] {
        if name == progs::SNI && sni_off.is_some() {
            let _ = std::fs::remove_file(pin.prog(name));
            continue;
        }
        pin_prog(pin, prog_mut::<Xdp>(&mut ebpf, name)?, name)?;
    }
    pin_prog(
        pin,
        prog_mut::<SchedClassifier>(&mut ebpf, progs::VM_EGRESS)?,
        progs::VM_EGRESS,
    )?;

    let mut router = Vec::new();
    for (name, ifindex) in &ifaces {
        let prog: &mut Xdp = prog_mut(&mut ebpf, progs::ROUTER)?;
        router.push(attach_xdp(pin, prog, name, *ifindex, opts.allow_generic)?);
    }
    // Ports already attached get the new VM program, in place.
    let mut ports_replaced = 0;
    for ifindex in pinned_links(pin, "tc")? {
        let prog: &mut SchedClassifier = prog_mut(&mut ebpf, progs::VM_EGRESS)?;
        let link = PinnedLink::from_pin(pin.tc_link(ifindex)).map_err(|e| {
            bpf_err(format!("opening the pinned TC link of ifindex {ifindex}"))(chain(&e))
        })?;
        let link = SchedClassifierLink::try_from(FdLink::from(link))
            .map_err(|e| bpf_err("TC link")(chain(&e)))?;
        prog.attach_to_link(link).map_err(|e| {
            bpf_err(format!("replacing the VM program on ifindex {ifindex}"))(chain(&e))
        })?;
        ports_replaced += 1;
    }
    // Netlink-attached ports (kernels without TCX): swap the filter (detach, attach).
    for ifindex in pinned_links(pin, "tcnl")? {
        let Ok(name) = netdev::name(ifindex) else {
            continue;
        };
        let _ =
            aya::programs::tc::qdisc_detach_program(&name, TcAttachType::Ingress, progs::VM_EGRESS);
        let prog: &mut SchedClassifier = prog_mut(&mut ebpf, progs::VM_EGRESS)?;
        attach_port_netlink(pin, prog, &name, ifindex)
            .map_err(|e| bpf_err(format!("replacing the VM program on {name}"))(e))?;
        ports_replaced += 1;
    }
    // The FIB lookups that send VM traffic out need forwarding on.
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");
    Ok(UpReport {
        pin_dir: pin.0.clone(),
        config: opts.config.clone(),
        router,
        ports_replaced,
        maps_reused,
        maps_created,
        warnings,
    })
}

fn pin_prog<T>(pin: &PinDir, prog: &mut T, name: &str) -> Result<()>
where
    T: PinProgram,
{
    let path = pin.prog(name);
    if path.exists() {
        std::fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
    }
    prog.pin_at(&path)
        .map_err(|e| bpf_err(format!("pinning {name} at {}", path.display()))(e))
}

/// The two program kinds we pin (aya's `pin` is per type).
pub(crate) trait PinProgram {
    fn pin_at(&mut self, path: &Path) -> std::result::Result<(), String>;
}
impl PinProgram for Xdp {
    fn pin_at(&mut self, path: &Path) -> std::result::Result<(), String> {
        self.pin(path).map_err(|e| chain(&e))
    }
}
impl PinProgram for SchedClassifier {
    fn pin_at(&mut self, path: &Path) -> std::result::Result<(), String> {
        self.pin(path).map_err(|e| chain(&e))
    }
}

fn attach_xdp(
    pin: &PinDir,
    prog: &mut Xdp,
    name: &str,
    ifindex: u32,
    allow_generic: bool,
) -> Result<Attachment> {
    let path = pin.xdp_link(ifindex);
    if path.exists() {
        let link = PinnedLink::from_pin(&path)
            .map_err(|e| bpf_err(format!("opening {}", path.display()))(chain(&e)))?;
        let link =
            XdpLink::try_from(FdLink::from(link)).map_err(|e| bpf_err("XDP link")(chain(&e)))?;
        prog.attach_to_link(link)
            .map_err(|e| bpf_err(format!("replacing the router on {name}"))(chain(&e)))?;
        return Ok(Attachment {
            interface: name.into(),
            ifindex,
            action: "replaced".into(),
            mode: "kept".into(),
        });
    }
    let (id, mode) = match prog.attach_to_if_index(ifindex, XdpMode::Driver) {
        Ok(id) => (id, "native"),
        Err(e) if allow_generic => {
            tracing::warn!(
                interface = name,
                error = %chain(&e),
                "no native XDP on this interface; using generic (skb) XDP, which is slower"
            );
            let id = prog
                .attach_to_if_index(ifindex, XdpMode::Skb)
                .map_err(|e| bpf_err(format!("attaching the router to {name}"))(chain(&e)))?;
            (id, "generic")
        }
        Err(e) => {
            return Err(bpf_err(format!(
                "attaching the router to {name} in native mode (add --allow-generic to fall \
                 back to the slower generic XDP)"
            ))(chain(&e)));
        }
    };
    let link = prog
        .take_link(id)
        .map_err(|e| bpf_err("taking the XDP link")(chain(&e)))?;
    let link = FdLink::try_from(link).map_err(|e| {
        bpf_err(format!(
            "the XDP attachment on {name} is not a bpf_link (kernel older than 5.9?)"
        ))(chain(&e))
    })?;
    link.pin(&path)
        .map_err(|e| bpf_err(format!("pinning {}", path.display()))(chain(&e)))?;
    Ok(Attachment {
        interface: name.into(),
        ifindex,
        action: "attached".into(),
        mode: mode.into(),
    })
}

/// Attaches the VM program (TC ingress: what the VM sends) to a host port; a no-op when
/// it already is. Kernels before 6.6 have no TCX links: there the program goes on a
/// clsact qdisc through netlink (a `tc` filter), marked by the program pinned at
/// [`PinDir::tc_netlink`] so later commands know the port is done.
pub fn attach_port(pin: &PinDir, ifindex: u32) -> Result<bool> {
    let path = pin.tc_link(ifindex);
    if path.exists() || pin.tc_netlink(ifindex).exists() {
        return Ok(false);
    }
    let mut prog = SchedClassifier::from_pin(pin.prog(progs::VM_EGRESS))
        .map_err(|e| bpf_err("opening the pinned VM program (run `boxd bpf up`)")(chain(&e)))?;
    let name = netdev::name(ifindex)?;
    let id = match prog.attach_with_options(
        &name,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    ) {
        Ok(id) => id,
        Err(tcx) => {
            attach_port_netlink(pin, &mut prog, &name, ifindex).map_err(|nl| {
                bpf_err(format!("attaching the VM program to {name}"))(format!(
                    "TCX: {}; netlink: {nl}",
                    chain(&tcx)
                ))
            })?;
            return Ok(true);
        }
    };
    let link = prog
        .take_link(id)
        .map_err(|e| bpf_err("taking the TC link")(chain(&e)))?;
    let link = FdLink::try_from(link).map_err(|e| bpf_err("TC link")(chain(&e)))?;
    link.pin(&path)
        .map_err(|e| bpf_err(format!("pinning {}", path.display()))(chain(&e)))?;
    Ok(true)
}

/// The pre-TCX way: a direct-action filter on the port's clsact qdisc. The filter lives
/// with the interface (a netlink attachment is not a pinnable link).
fn attach_port_netlink(
    pin: &PinDir,
    prog: &mut SchedClassifier,
    name: &str,
    ifindex: u32,
) -> std::result::Result<(), String> {
    use aya::programs::tc::{NlOptions, qdisc_add_clsact};
    if let Err(e) = qdisc_add_clsact(name) {
        let text = chain(&e);
        if !text.contains("exists") {
            return Err(format!("adding the clsact qdisc: {text}"));
        }
    }
    let id = prog
        .attach_with_options(
            name,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )
        .map_err(|e| chain(&e))?;
    // The filter must outlive this process: leak the link handle (dropping it detaches).
    let link = prog.take_link(id).map_err(|e| chain(&e))?;
    std::mem::forget(link);
    let marker = pin.tc_netlink(ifindex);
    let _ = std::fs::remove_file(&marker);
    prog.pin_at(&marker)
}

/// Detaches the VM program from a host port (a missing link is not an error).
pub fn detach_port(pin: &PinDir, ifindex: u32) -> Result<bool> {
    let nl = pin.tc_netlink(ifindex);
    if nl.exists() {
        if let Ok(name) = netdev::name(ifindex) {
            let _ = aya::programs::tc::qdisc_detach_program(
                &name,
                TcAttachType::Ingress,
                progs::VM_EGRESS,
            );
        }
        std::fs::remove_file(&nl).map_err(io_err(format!("removing {}", nl.display())))?;
        return Ok(true);
    }
    let path = pin.tc_link(ifindex);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
    }
}

/// Attaches the pass-through XDP program to an interface (a veth peer that must run XDP
/// to receive redirected frames); pinned like the others.
pub fn attach_pass(pin: &PinDir, name: &str) -> Result<()> {
    let ifindex = netdev::ifindex(name)?;
    let path = pin.link("pass", ifindex);
    if path.exists() {
        return Ok(());
    }
    let mut prog = Xdp::from_pin(
        pin.prog(progs::PASS),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .map_err(|e| bpf_err("opening the pinned pass program (run `boxd bpf up`)")(chain(&e)))?;
    let id = prog
        .attach_to_if_index(ifindex, XdpMode::Driver)
        .map_err(|e| bpf_err(format!("attaching XDP pass to {name}"))(chain(&e)))?;
    let link = prog
        .take_link(id)
        .map_err(|e| bpf_err("taking the XDP link")(chain(&e)))?;
    let link = FdLink::try_from(link).map_err(|e| bpf_err("XDP link")(chain(&e)))?;
    link.pin(&path)
        .map_err(|e| bpf_err(format!("pinning {}", path.display()))(chain(&e)))?;
    Ok(())
}

/// Ifindexes of this namespace's pinned links of one kind ("xdp", "tc", "pass").
pub fn pinned_links(pin: &PinDir, kind: &str) -> Result<Vec<u32>> {
    let prefix = format!("{kind}-{}-", netns_id());
    let dir = pin.links();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("reading {}", dir.display()))(e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&prefix)
            && let Ok(i) = rest.parse()
        {
            out.push(i);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Detaches everything and removes the pin directory (maps and their entries go).
pub fn down(pin: &PinDir) -> Result<usize> {
    if !pin.0.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    // Links first (detaches), then programs, then maps.
    for sub in [pin.links(), pin.0.join("progs"), pin.0.clone()] {
        let rd = match std::fs::read_dir(&sub) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(format!("reading {}", sub.display()))(e)),
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                continue;
            }
            std::fs::remove_file(&p).map_err(io_err(format!("removing {}", p.display())))?;
            removed += 1;
        }
        if sub != pin.0 {
            let _ = std::fs::remove_dir(&sub);
        }
    }
    std::fs::remove_dir(&pin.0).map_err(io_err(format!("removing {}", pin.0.display())))?;
    Ok(removed)
}

/// Opens a pinned map by name.
pub(crate) fn open_map(pin: &PinDir, name: &str) -> Result<aya::maps::Map> {
    let path = pin.map(name);
    if !path.exists() {
        return Err(DpError::NotUp(pin.0.clone()));
    }
    let data = MapData::from_pin(&path)
        .map_err(|e| bpf_err(format!("opening pinned map {}", path.display()))(chain(&e)))?;
    aya::maps::Map::from_map_data(data)
        .map_err(|e| bpf_err(format!("pinned map {}", path.display()))(chain(&e)))
}

/// A bounded wait used by event readers.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
