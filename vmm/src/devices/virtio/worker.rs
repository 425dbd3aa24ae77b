//! A device's worker thread: an epoll loop over the device's eventfds and sockets, with
//! a stop eventfd so that reset and VM shutdown end it promptly.

use std::os::fd::RawFd;
use std::thread::JoinHandle;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Token the loop reserves for its stop eventfd.
const STOP_TOKEN: u64 = u64::MAX;
/// Events handled per epoll_wait; more are picked up by the next wait.
const EVENTS_MAX: usize = 64;

/// What a worker's handler can do to the loop it runs in.
pub struct Registrar<'a> {
    epoll: &'a Epoll,
}

impl Registrar<'_> {
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        assert_ne!(token, STOP_TOKEN, "token reserved for the stop eventfd");
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

pub trait Handler: Send + 'static {
    /// Registers the handler's initial fds.
    fn init(&mut self, reg: &Registrar) -> std::io::Result<()>;
    /// Handles readiness of the fd registered under `token`.
    fn handle(&mut self, reg: &Registrar, token: u64, events: EventSet);
}

/// A running worker; dropping it stops and joins the thread, and [`Worker::stop`] also
/// hands back the handler (with its queues, for a snapshot).
pub struct Worker<H: Handler> {
    stop: EventFd,
    thread: Option<JoinHandle<H>>,
}

impl<H: Handler> Worker<H> {
    pub fn spawn(name: String, mut handler: H) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd_(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        handler.init(&Registrar { epoll: &epoll })?;
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut events = vec![EpollEvent::default(); EVENTS_MAX];
                loop {
                    let n = match epoll.wait(-1, &mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(worker = name, "epoll_wait failed, worker stops: {e}");
                            return handler;
                        }
                    };
                    let reg = Registrar { epoll: &epoll };
                    for ev in &events[..n] {
                        if ev.data() == STOP_TOKEN {
                            return handler;
                        }
                        handler.handle(&reg, ev.data(), ev.event_set());
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl<H: Handler> Worker<H> {
    /// Stops the thread after the event it is handling and returns its handler; None
    /// when the thread panicked.
    pub fn stop(mut self) -> Option<H> {
        let _ = self.stop.write(1);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl<H: Handler> Drop for Worker<H> {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `AsRawFd` for EventFd without importing the trait everywhere.
pub trait AsRawFdExt {
    fn as_raw_fd_(&self) -> RawFd;
}

impl AsRawFdExt for EventFd {
    fn as_raw_fd_(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self)
    }
}
