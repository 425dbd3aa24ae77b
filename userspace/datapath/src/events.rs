//! The wake-event stream: the router and the SNI parser put an event on a BPF ring
//! buffer when traffic arrives for a VM that is not running (at most one per VM per
//! interval); this reads them into a bounded channel the worker subscribes to.
//!
//! A ring buffer has one consumer position, so two readers would steal each other's
//! events: the subscription holds an exclusive lock on the pin directory, and a second
//! subscriber is told who to ask instead.

use crate::common::{WAKE_PACKET, WAKE_SNI, WakeEvent, maps, vm_state_name};
use crate::{DpError, PinDir, Result, bpf_err, chain, io_err, key_addr, open_map};
use aya::maps::{MapData, RingBuf};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

/// Events the channel holds before new ones are dropped (and counted).
pub const QUEUE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Wake {
    pub public: Ipv4Addr,
    pub vm_id: u32,
    pub node: u32,
    /// "packet" (the router) or "sni" (a ClientHello for one of its domains).
    pub reason: &'static str,
    /// The state the VM had in the map when the traffic came.
    pub state: &'static str,
    /// CLOCK_MONOTONIC nanoseconds when the kernel raised it.
    pub ktime_ns: u64,
}

impl Wake {
    fn from_raw(e: &WakeEvent) -> Self {
        Self {
            public: key_addr(e.public_addr),
            vm_id: e.vm_id,
            node: e.node,
            reason: match e.reason {
                WAKE_PACKET => "packet",
                WAKE_SNI => "sni",
                _ => "unknown",
            },
            state: vm_state_name(e.state as u8),
            ktime_ns: e.ktime_ns,
        }
    }
}

/// What [`Subscription::next`] found.
#[derive(Debug)]
pub enum Next {
    Event(Wake),
    Timeout,
    Closed,
}

/// A running subscription; dropping it stops the reader thread.
pub struct Subscription {
    rx: Receiver<Wake>,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Subscription {
    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Wake> {
        self.rx.recv_timeout(timeout).ok()
    }
    /// The next event, a timeout, or the end of the stream (the reader thread is gone:
    /// nothing will ever come, so a loop over this must stop rather than spin).
    pub fn next(&self, timeout: Duration) -> Next {
        match self.rx.recv_timeout(timeout) {
            Ok(w) => Next::Event(w),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Next::Timeout,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Next::Closed,
        }
    }
    /// Events lost because this subscriber fell more than [`QUEUE`] behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Takes the exclusive consumer lock of this pin directory.
fn lock(pin: &PinDir) -> Result<OwnedFd> {
    let f = std::fs::File::open(&pin.0).map_err(io_err(format!("opening {}", pin.0.display())))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(DpError::Invalid(format!(
            "another process already reads the wake events of {} (the worker, or another \
             `boxd bpf events`); a ring buffer has a single reader",
            pin.0.display()
        )));
    }
    Ok(f.into())
}

/// Starts reading wake events.
pub fn subscribe(pin: &PinDir) -> Result<Subscription> {
    pin.require_up()?;
    let lock = lock(pin)?;
    let ring: RingBuf<MapData> = RingBuf::try_from(open_map(pin, maps::EVENTS)?)
        .map_err(|e| bpf_err("map BOXD_EVENTS")(chain(&e)))?;
    let (tx, rx) = sync_channel(QUEUE);
    let stop = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let thread = {
        let (stop, dropped) = (stop.clone(), dropped.clone());
        std::thread::Builder::new()
            .name("boxd-wake-events".into())
            .spawn(move || read_loop(ring, tx, stop, dropped, lock))
            .map_err(io_err("starting the wake-event reader"))?
    };
    Ok(Subscription {
        rx,
        stop,
        dropped,
        thread: Some(thread),
    })
}

fn read_loop(
    mut ring: RingBuf<MapData>,
    tx: SyncSender<Wake>,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    _lock: OwnedFd,
) {
    let fd = ring.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own, a bounded timeout.
        unsafe { libc::poll(&mut pfd, 1, crate::POLL_INTERVAL.as_millis() as i32) };
        // Bounded per wake-up: the ring holds at most EVENTS_BYTES of events.
        for _ in 0..4096 {
            let Some(item) = ring.next() else { break };
            if item.len() < std::mem::size_of::<WakeEvent>() {
                continue;
            }
            // SAFETY: the item holds at least one WakeEvent (checked above), written by
            // the kernel programs with this layout; read unaligned into a copy.
            let raw = unsafe { (item.as_ptr() as *const WakeEvent).read_unaligned() };
            drop(item);
            match tx.try_send(Wake::from_raw(&raw)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}
