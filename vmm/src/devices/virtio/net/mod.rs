//! virtio-net as a vhost-user frontend: the VMM owns the device's registers and config
//! space (MAC, link status, queue pairs); the data queues themselves are served by the
//! vhost-user backend (`boxd net`), which maps the guest's memfd, waits on the very
//! ioeventfds KVM signals and injects the device's irqfd. No packet passes through the
//! VMM. With more than one queue pair the VMM serves the control queue itself: the
//! guest's "use N pairs" command turns into SET_VRING_ENABLE for the backend.

use crate::devices::virtio::worker::{AsRawFdExt, Handler, Registrar, Worker};
use crate::devices::virtio::{
    ActivateError, Activation, Start, TYPE_NET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice, read_config_bytes,
};
use crate::lazy::{Backend, LazyMemory, Span};
use crate::memory::GuestMemory;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::Bytes;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;
const S_LINK_UP: u16 = 1;
const QUEUE_SIZE: u16 = 256;
const CTRL_QUEUE_SIZE: u16 = 64;
/// Most queue pairs a VM's NIC gets (the backend may allow fewer).
pub const MAX_QUEUE_PAIRS: usize = 16;
const CTRL_CLASS_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;

/// Data-path features the backend may offer that the guest may use: checksum and
/// segmentation offloads both ways, mergeable rx buffers, event index.
const DATA_PATH: u64 = (1 << 0) | (1 << 1) | (0x7f << 7) | (1 << 15) | VIRTIO_RING_F_EVENT_IDX;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "vhost-user network backend at {socket}: {source}; start it first (boxd net port --socket {socket} --tap NAME)"
    )]
    Connect {
        socket: PathBuf,
        source: vhost::Error,
    },
    #[error("vhost-user network backend at {socket}: {what}: {source}")]
    Protocol {
        socket: PathBuf,
        what: &'static str,
        source: vhost::Error,
    },
}

pub struct Net {
    frontend: Arc<Mutex<Frontend>>,
    socket: PathBuf,
    backend_features: u64,
    protocol: bool,
    features: u64,
    config: [u8; 12],
    mem: GuestMemory,
    /// Queue pairs offered to the guest.
    pairs: usize,
    sizes: Vec<u16>,
    /// Data queues handed to the backend, as they were handed over.
    rings: Vec<(usize, QueueState)>,
    /// Queue pairs the driver asked to use (the control queue's MQ command).
    in_use: Arc<AtomicUsize>,
    ctrl: Option<Worker<CtrlQueue>>,
    /// Guest memory still loading (a lazy restore), and whether the backend can take
    /// part in it (VHOST_USER_PROTOCOL_F_PAGEFAULT).
    lazy: Option<Arc<LazyMemory>>,
    pagefault: bool,
}

/// How long activation waits for a lazy restore to finish loading memory when the
/// backend cannot be handed its faults (memory size at disk speed fits in this).
const LOAD_WAIT: Duration = Duration::from_secs(600);

/// What the net frontend keeps beyond its queues.
#[derive(serde::Serialize, serde::Deserialize)]
struct NetState {
    pairs_in_use: usize,
}

impl Net {
    /// Connects to the backend and negotiates what the device will offer the guest:
    /// up to `queue_pairs` pairs, as many as the backend serves.
    pub fn new(
        socket: &Path,
        mac: [u8; 6],
        mem: &GuestMemory,
        queue_pairs: usize,
        lazy: Option<Arc<LazyMemory>>,
    ) -> Result<Self, NetError> {
        let err = |what: &'static str| {
            let socket = socket.to_path_buf();
            move |source| NetError::Protocol {
                socket,
                what,
                source,
            }
        };
        let wanted_pairs = queue_pairs.clamp(1, MAX_QUEUE_PAIRS);
        let mut frontend =
            Frontend::connect(socket, 2 * wanted_pairs as u64).map_err(|source| {
                NetError::Connect {
                    socket: socket.to_path_buf(),
                    source,
                }
            })?;
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let mut pairs = 1;
        let mut pagefault = false;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            let wanted = offered
                & (VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::PAGEFAULT);
            pagefault = wanted.contains(VhostUserProtocolFeatures::PAGEFAULT);
            frontend
                .set_protocol_features(wanted)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
            if wanted_pairs > 1
                && wanted.contains(VhostUserProtocolFeatures::MQ)
                && backend_features & F_MQ != 0
            {
                let queues = frontend.get_queue_num().map_err(err("GET_QUEUE_NUM"))?;
                pairs = wanted_pairs.min(queues as usize / 2).max(1);
            }
        }
        let mq = if pairs > 1 { F_MQ | F_CTRL_VQ } else { 0 };
        let features = (backend_features & DATA_PATH) | VIRTIO_F_VERSION_1 | F_MAC | F_STATUS | mq;
        let mut config = [0u8; 12];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&(pairs as u16).to_le_bytes());
        let mut sizes = vec![QUEUE_SIZE; 2 * pairs];
        if pairs > 1 {
            sizes.push(CTRL_QUEUE_SIZE);
        }
        Ok(Self {
            frontend: Arc::new(Mutex::new(frontend)),
            socket: socket.to_path_buf(),
            backend_features,
            protocol,
            features,
            config,
            mem: mem.clone(),
            pairs,
            sizes,
            rings: Vec::new(),
            in_use: Arc::new(AtomicUsize::new(1)),
            ctrl: None,
            lazy,
            pagefault,
        })
    }

    /// Gives the backend the memory table. While a lazy restore is loading memory
    /// and the backend supports it, in postcopy mode: the backend registers its
    /// mapping with a userfaultfd of its own, which the restore's fault thread then
    /// serves; otherwise memory is loaded whole first.
    fn give_memory(
        &self,
        frontend: &mut Frontend,
        regions: &[VhostUserMemoryRegionInfo],
    ) -> Result<(), ActivateError> {
        let Some(lazy) = self.lazy.as_ref().filter(|l| !l.is_done()) else {
            frontend
                .set_mem_table(regions)
                .map_err(|e| self.bad("SET_MEM_TABLE", e))?;
            return Ok(());
        };
        if !self.pagefault || !lazy.is_open() {
            if !self.pagefault {
                tracing::info!(
                    backend = %self.socket.display(),
                    "the network backend cannot take part in a lazy restore (no PAGEFAULT); loading guest memory first"
                );
            }
            lazy.load_all(LOAD_WAIT)
                .map_err(|e| self.bad("load guest memory before the memory table", e))?;
            frontend
                .set_mem_table(regions)
                .map_err(|e| self.bad("SET_MEM_TABLE", e))?;
            return Ok(());
        }
        let uffd = frontend
            .postcopy_advise()
            .map_err(|e| self.bad("POSTCOPY_ADVISE", e))?;
        frontend
            .postcopy_listen()
            .map_err(|e| self.bad("POSTCOPY_LISTEN", e))?;
        let bases = frontend
            .set_mem_table(regions)
            .map_err(|e| self.bad("SET_MEM_TABLE (postcopy)", e))?
            .ok_or_else(|| {
                self.bad(
                    "SET_MEM_TABLE (postcopy)",
                    "no mapping addresses in the reply",
                )
            })?;
        if bases.len() != regions.len() {
            return Err(self.bad("SET_MEM_TABLE (postcopy)", "a reply for other regions"));
        }
        let spans = regions
            .iter()
            .zip(&bases)
            .map(|(r, &base)| Span {
                host: base,
                offset: r.mmap_offset,
                len: r.memory_size,
            })
            .collect();
        let ender = self.frontend.clone();
        let backend = Backend {
            uffd,
            spans,
            end: Box::new(move || {
                ender
                    .lock()
                    .map_err(|_| "backend connection lock poisoned".to_string())?
                    .postcopy_end()
                    .map_err(|e| format!("POSTCOPY_END: {e}"))
            }),
        };
        if lazy.add_backend(backend).is_err() {
            return Err(self.bad("postcopy", "the restore stopped taking backends"));
        }
        frontend
            .postcopy_ack_mem_regions(FrontendReq::SET_MEM_TABLE)
            .map_err(|e| self.bad("postcopy memory table acknowledgement", e))
    }

    fn bad(&self, what: &str, e: impl std::fmt::Display) -> ActivateError {
        ActivateError::Bad {
            device: "net",
            reason: format!("backend {}: {what}: {e}", self.socket.display()),
        }
    }

    fn host_address(&self, addr: u64) -> Result<u64, ActivateError> {
        self.mem
            .get_host_address(GuestAddress(addr))
            .map(|p| p as u64)
            .map_err(|e| self.bad("queue address outside guest memory", e))
    }
}

impl VirtioDevice for Net {
    fn name(&self) -> &'static str {
        "net"
    }

    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn interrupts_bypass_transport(&self) -> bool {
        true
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let backend_acked = (a.features & self.backend_features)
            | (self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        let mq = a.features & F_MQ != 0;
        if let Some(l) = self.lazy.as_ref().filter(|l| !l.is_open() && !l.is_done()) {
            // A driver (re)starting the device while memory still loads: the backend's
            // postcopy is ending (which needs the connection), so wait for that first.
            l.wait_done(LOAD_WAIT)
                .map_err(|e| self.bad("wait for guest memory", e))?;
        }
        let mut frontend = self
            .frontend
            .lock()
            .map_err(|_| self.bad("backend connection", "lock poisoned"))?;
        frontend
            .set_features(backend_acked)
            .map_err(|e| self.bad("SET_FEATURES", e))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()
            .map_err(|e| self.bad("describe guest memory", e))?;
        self.give_memory(&mut frontend, &regions)?;
        let data_queues = 2 * self.pairs;
        if a.start == Start::Fresh {
            self.in_use.store(1, Ordering::Relaxed);
        }
        // With MQ the device starts on the first pair until the driver asks for more
        // (virtio 1.2, 5.1.6.5.5); a resumed device goes on with what it was asked for.
        let in_use = if mq {
            self.in_use.load(Ordering::Relaxed)
        } else {
            self.pairs
        };
        let mut ctrl = None;
        let mut rings = Vec::new();
        for (i, q, kick) in a.queues {
            if i >= data_queues {
                ctrl = Some((q, kick));
                continue;
            }
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: self.host_address(q.desc_table())?,
                used_ring_addr: self.host_address(q.used_ring())?,
                avail_ring_addr: self.host_address(q.avail_ring())?,
                log_addr: None,
            };
            frontend
                .set_vring_num(i, q.size())
                .map_err(|e| self.bad("SET_VRING_NUM", e))?;
            frontend
                .set_vring_addr(i, &cfg)
                .map_err(|e| self.bad("SET_VRING_ADDR", e))?;
            // A fresh queue starts at 0; a resumed or restored one where the backend
            // stopped it (GET_VRING_BASE at the save).
            frontend
                .set_vring_base(i, q.next_avail())
                .map_err(|e| self.bad("SET_VRING_BASE", e))?;
            frontend
                .set_vring_call(i, a.interrupt.irqfd())
                .map_err(|e| self.bad("SET_VRING_CALL", e))?;
            frontend
                .set_vring_kick(i, &kick)
                .map_err(|e| self.bad("SET_VRING_KICK", e))?;
            if self.protocol {
                frontend
                    .set_vring_enable(i, i < 2 * in_use)
                    .map_err(|e| self.bad("SET_VRING_ENABLE", e))?;
            }
            rings.push((i, q.state()));
        }
        drop(frontend);
        self.rings = rings;
        if let Some((queue, kick)) = ctrl {
            let handler = CtrlQueue {
                queue,
                kick,
                mem: a.mem.clone(),
                interrupt: a.interrupt.clone(),
                frontend: self.frontend.clone(),
                pairs: self.pairs,
                in_use: self.in_use.clone(),
                protocol: self.protocol,
            };
            self.ctrl = Some(Worker::spawn("virtio-net-ctrl".into(), handler).map_err(
                |source| ActivateError::Io {
                    device: "net",
                    source,
                },
            )?);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.ctrl = None;
        let Ok(mut frontend) = self.frontend.lock() else {
            return;
        };
        // GET_VRING_BASE stops a ring; the backend then forgets it until set up again.
        for (i, _) in std::mem::take(&mut self.rings) {
            if self.protocol {
                let _ = frontend.set_vring_enable(i, false);
            }
            if let Err(e) = frontend.get_vring_base(i) {
                tracing::warn!("vhost-user net: stopping queue {i}: {e}");
            }
        }
    }

    /// Stops the backend's rings (GET_VRING_BASE: the backend completes what it popped
    /// and reports where it stopped) and the control queue. Frames that arrive for the
    /// guest meanwhile wait in the backend's port, which outlives this VMM.
    fn quiesce(&mut self) -> Result<Vec<(usize, QueueState)>, String> {
        let mut queues = Vec::new();
        if let Some(worker) = self.ctrl.take() {
            let ctrl = worker
                .stop()
                .ok_or("its control queue thread had panicked")?;
            queues.push((2 * self.pairs, ctrl.queue.state()));
        }
        let frontend = self
            .frontend
            .lock()
            .map_err(|_| "the backend connection's lock is poisoned".to_string())?;
        for (i, mut state) in std::mem::take(&mut self.rings) {
            let base = frontend.get_vring_base(i).map_err(|e| {
                format!(
                    "backend {}: GET_VRING_BASE of queue {i}: {e}",
                    self.socket.display()
                )
            })?;
            // The backend's used index is in guest memory, where it wrote it.
            let used: u16 = self
                .mem
                .read_obj(GuestAddress(state.used_ring + 2))
                .map_err(|e| format!("reading queue {i}'s used index: {e}"))?;
            state.next_avail = base as u16;
            state.next_used = used;
            queues.push((i, state));
        }
        Ok(queues)
    }

    fn save_state(&self) -> serde_json::Value {
        serde_json::to_value(NetState {
            pairs_in_use: self.in_use.load(Ordering::Relaxed),
        })
        .unwrap_or_default()
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: NetState = serde_json::from_value(state.clone())
            .map_err(|e| format!("its saved state does not read: {e}"))?;
        if !(1..=self.pairs).contains(&s.pairs_in_use) {
            return Err(format!(
                "the guest used {} queue pairs; the backend now serves {}",
                s.pairs_in_use, self.pairs
            ));
        }
        self.in_use.store(s.pairs_in_use, Ordering::Relaxed);
        Ok(())
    }
}

/// The control queue, served by the VMM: the driver's "use N queue pairs" becomes
/// SET_VRING_ENABLE for the backend; any other command is refused (its features are
/// not offered).
struct CtrlQueue {
    queue: Queue,
    kick: EventFd,
    mem: GuestMemory,
    interrupt: Arc<crate::devices::virtio::Interrupt>,
    frontend: Arc<Mutex<Frontend>>,
    pairs: usize,
    in_use: Arc<AtomicUsize>,
    protocol: bool,
}

const CTRL_KICK: u64 = 0;

impl CtrlQueue {
    /// Executes one command; returns the status byte for the driver.
    fn execute(&self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        if class != CTRL_CLASS_MQ || cmd != CTRL_MQ_VQ_PAIRS_SET || data.len() < 2 {
            return CTRL_ERR;
        }
        let n = usize::from(u16::from_le_bytes([data[0], data[1]]));
        if !(1..=self.pairs).contains(&n) || !self.protocol {
            return CTRL_ERR;
        }
        let Ok(mut frontend) = self.frontend.lock() else {
            return CTRL_ERR;
        };
        for i in 0..2 * self.pairs {
            if let Err(e) = frontend.set_vring_enable(i, i < 2 * n) {
                tracing::warn!("vhost-user net: enabling {n} queue pairs: {e}");
                return CTRL_ERR;
            }
        }
        self.in_use.store(n, Ordering::Relaxed);
        tracing::debug!("virtio-net: the guest uses {n} queue pairs");
        CTRL_OK
    }

    fn process(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        for _ in 0..CTRL_QUEUE_SIZE {
            let Some(chain) = self.queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            // Readable: class, command, data; writable: one status byte.
            let mut input = [0u8; 64];
            let mut got = 0;
            let mut status_at = None;
            for d in chain {
                if d.is_write_only() {
                    status_at.get_or_insert(d.addr());
                } else {
                    let n = (d.len() as usize).min(input.len() - got);
                    if n > 0 && mem.read_slice(&mut input[got..got + n], d.addr()).is_ok() {
                        got += n;
                    }
                }
            }
            let status = if got >= 2 {
                self.execute(input[0], input[1], &input[2..got])
            } else {
                CTRL_ERR
            };
            let written = status_at
                .map(|a| mem.write_slice(&[status], a).is_ok())
                .unwrap_or(false);
            if self.queue.add_used(&mem, head, u32::from(written)).is_err() {
                break;
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used();
        }
    }
}

impl Handler for CtrlQueue {
    fn init(&mut self, reg: &Registrar) -> std::io::Result<()> {
        reg.add(self.kick.as_raw_fd_(), CTRL_KICK, EventSet::IN)
    }

    fn handle(&mut self, _reg: &Registrar, token: u64, _events: EventSet) {
        if token == CTRL_KICK {
            let _ = self.kick.read();
            self.process();
        }
    }
}
