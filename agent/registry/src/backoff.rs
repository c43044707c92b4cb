//! Exponential backoff with jitter for reconnecting to etcd, so that many engines that lost
//! etcd at the same moment do not all come back in the same millisecond.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, next: initial }
    }

    /// The wait before the next attempt; each call doubles the following one up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // Up to +25% jitter.
        let jitter_ms = rand::rng().random_range(0..=base.as_millis() as u64 / 4);
        base + Duration::from_millis(jitter_ms)
    }

    /// After a success the next failure starts over from `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<u128> = (0..4).map(|_| b.next_delay().as_millis()).collect();
        assert!((100..=125).contains(&delays[0]));
        assert!((200..=250).contains(&delays[1]));
        assert!((400..=500).contains(&delays[2]));
        assert!((400..=500).contains(&delays[3]));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(125));
    }
}
