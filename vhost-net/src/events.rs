//! What ports tell the worker: "frames are waiting for a VM whose VMM is away", once per
//! absence. The eBPF data path raises the same wake-up for traffic it routes; this one
//! comes from the port itself, so a VM wakes on any frame that reaches its TAP.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

/// Events a subscriber may lag behind before it misses some.
const QUEUE: usize = 256;
/// Most subscribers at once.
pub const MAX_SUBSCRIBERS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// "waiting": the port holds frames and no frontend is attached.
    pub event: String,
    pub port: String,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl Event {
    pub fn waiting(port: &str) -> Self {
        Self {
            event: "waiting".into(),
            port: port.into(),
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

/// A bounded fan-out of events to subscribers; a subscriber that falls behind misses
/// events rather than slowing a port down, and one that left is dropped at the next
/// publish.
#[derive(Default)]
pub struct Bus {
    subscribers: Mutex<Vec<SyncSender<Event>>>,
}

impl Bus {
    /// A new subscription, or None when there are already [`MAX_SUBSCRIBERS`].
    pub fn subscribe(&self) -> Option<Receiver<Event>> {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        if subs.len() >= MAX_SUBSCRIBERS {
            return None;
        }
        let (tx, rx) = sync_channel(QUEUE);
        subs.push(tx);
        Some(rx)
    }

    pub fn publish(&self, event: &Event) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| match s.try_send(event.clone()) {
            Ok(()) | Err(TrySendError::Full(_)) => true,
            Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_events_and_leavers_are_dropped() {
        let bus = Bus::default();
        let a = bus.subscribe().unwrap();
        let b = bus.subscribe().unwrap();
        bus.publish(&Event::waiting("x"));
        assert_eq!(a.recv().unwrap().port, "x");
        assert_eq!(
            b.recv().unwrap().port,
            "x",
            "every subscriber gets the event"
        );
        drop(b);
        bus.publish(&Event::waiting("y"));
        assert_eq!(a.recv().unwrap().port, "y");
        assert_eq!(bus.subscribers.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_slow_subscriber_misses_events_but_never_blocks() {
        let bus = Bus::default();
        let a = bus.subscribe().unwrap();
        for _ in 0..QUEUE + 10 {
            bus.publish(&Event::waiting("x"));
        }
        assert_eq!(a.try_iter().count(), QUEUE);
    }
}
