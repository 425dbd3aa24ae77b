//! virtio-net as a vhost-user frontend: the VMM owns the device's registers and config
//! space (MAC, link status); the queues themselves are served by the vhost-user
//! backend (`boxd net`), which maps the guest's memfd, waits on the very ioeventfds KVM
//! signals and injects the device's irqfd. No packet passes through the VMM.

use crate::devices::virtio::{
    ActivateError, Activation, TYPE_NET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
    read_config_bytes,
};
use crate::memory::GuestMemory;
use std::path::{Path, PathBuf};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const S_LINK_UP: u16 = 1;
const QUEUE_SIZE: u16 = 256;

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
    frontend: Frontend,
    socket: PathBuf,
    backend_features: u64,
    protocol: bool,
    features: u64,
    config: [u8; 12],
    mem: GuestMemory,
    active: usize,
}

impl Net {
    /// Connects to the backend and negotiates what the device will offer the guest.
    pub fn new(socket: &Path, mac: [u8; 6], mem: &GuestMemory) -> Result<Self, NetError> {
        let err = |what: &'static str| {
            let socket = socket.to_path_buf();
            move |source| NetError::Protocol {
                socket,
                what,
                source,
            }
        };
        let mut frontend = Frontend::connect(socket, 2).map_err(|source| NetError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            let wanted = offered & VhostUserProtocolFeatures::REPLY_ACK;
            frontend
                .set_protocol_features(wanted)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
        }
        let features = (backend_features & DATA_PATH) | VIRTIO_F_VERSION_1 | F_MAC | F_STATUS;
        let mut config = [0u8; 12];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        Ok(Self {
            frontend,
            socket: socket.to_path_buf(),
            backend_features,
            protocol,
            features,
            config,
            mem: mem.clone(),
            active: 0,
        })
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
        &[QUEUE_SIZE, QUEUE_SIZE]
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
        self.frontend
            .set_features(backend_acked)
            .map_err(|e| self.bad("SET_FEATURES", e))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = self
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<_, _>>()
            .map_err(|e| self.bad("describe guest memory", e))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| self.bad("SET_MEM_TABLE", e))?;
        for (i, q, kick) in &a.queues {
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: self.host_address(q.desc_table())?,
                used_ring_addr: self.host_address(q.used_ring())?,
                avail_ring_addr: self.host_address(q.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(*i, q.size())
                .map_err(|e| self.bad("SET_VRING_NUM", e))?;
            self.frontend
                .set_vring_addr(*i, &cfg)
                .map_err(|e| self.bad("SET_VRING_ADDR", e))?;
            self.frontend
                .set_vring_base(*i, 0)
                .map_err(|e| self.bad("SET_VRING_BASE", e))?;
            self.frontend
                .set_vring_call(*i, a.interrupt.irqfd())
                .map_err(|e| self.bad("SET_VRING_CALL", e))?;
            self.frontend
                .set_vring_kick(*i, kick)
                .map_err(|e| self.bad("SET_VRING_KICK", e))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(*i, true)
                    .map_err(|e| self.bad("SET_VRING_ENABLE", e))?;
            }
        }
        self.active = a.queues.len();
        Ok(())
    }

    fn reset(&mut self) {
        // GET_VRING_BASE stops a ring; the backend then forgets it until set up again.
        for i in 0..self.active {
            if self.protocol {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                tracing::warn!("vhost-user net: stopping queue {i}: {e}");
            }
        }
        self.active = 0;
    }
}
