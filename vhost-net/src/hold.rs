//! Frames waiting for a VM that cannot take them yet: no VMM attached (paused,
//! suspended, restarting) or no receive buffers. Bounded by count and by bytes; past
//! either bound new frames are dropped and counted (the oldest are kept, so the first
//! packet of a connection, the one that wakes the VM, survives).

use std::collections::VecDeque;

/// Limits of one port's hold queue.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HoldLimits {
    pub frames: usize,
    pub bytes: usize,
}

impl Default for HoldLimits {
    /// About a second of a busy link: enough for a VM to wake, small per VM.
    fn default() -> Self {
        Self {
            frames: 1024,
            bytes: 4 << 20,
        }
    }
}

#[derive(Debug, Default)]
pub struct Hold {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
    limits: HoldLimits,
}

impl Hold {
    pub fn new(limits: HoldLimits) -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
            limits,
        }
    }

    /// Queues a frame at the back; returns false (frame dropped) when full.
    pub fn push(&mut self, frame: Vec<u8>) -> bool {
        if self.frames.len() >= self.limits.frames || self.bytes + frame.len() > self.limits.bytes {
            return false;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        true
    }

    /// Puts back a frame taken with `pop` that could not be delivered after all; it
    /// was counted in the bounds before, so it always fits.
    pub fn unpop(&mut self, frame: Vec<u8>) {
        self.bytes += frame.len();
        self.frames.push_front(frame);
    }

    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let f = self.frames.pop_front()?;
        self.bytes -= f.len();
        Some(f)
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_drops_new_frames_past_either_bound() {
        let mut h = Hold::new(HoldLimits {
            frames: 3,
            bytes: 10,
        });
        assert!(h.push(vec![1; 4]));
        assert!(h.push(vec![2; 4]));
        assert!(!h.push(vec![3; 4]), "12 bytes > 10");
        assert!(h.push(vec![4; 2]));
        assert!(!h.push(vec![5; 1]), "4 frames > 3");
        assert_eq!((h.len(), h.bytes()), (3, 10));
        let first = h.pop().unwrap();
        assert_eq!(first, vec![1; 4]);
        h.unpop(first);
        assert_eq!(h.pop().unwrap()[0], 1);
        assert_eq!(h.pop().unwrap()[0], 2);
        assert_eq!(h.pop().unwrap()[0], 4);
        assert!(h.pop().is_none() && h.bytes() == 0);
    }
}
