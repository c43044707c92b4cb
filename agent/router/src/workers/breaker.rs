//! A circuit breaker per worker: after a run of consecutive failures the worker is ejected
//! for a cool-down; then one request at a time is let through as a probe. A probe that
//! succeeds closes the breaker; one that fails ejects the worker again for twice as long.
//!
//! Probes are real requests: the proxy retries a failed probe on another worker, so the
//! client does not pay for it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    /// Ejected until the instant.
    Open { until: Instant },
    /// One probe may run; `probing` while it does.
    HalfOpen { probing: bool },
}

#[derive(Debug, Clone, Copy)]
pub struct BreakerPolicy {
    pub failures_to_open: u32,
    pub first_cooldown: Duration,
    pub max_cooldown: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy { failures_to_open: 3, first_cooldown: Duration::from_secs(2), max_cooldown: Duration::from_secs(30) }
    }
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    cooldown: Duration,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
}

/// What a request got from the breaker when it was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

impl CircuitBreaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        CircuitBreaker {
            policy,
            inner: Mutex::new(Inner { state: BreakerState::Closed, consecutive_failures: 0, cooldown: policy.first_cooldown }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// Whether a request could be let through now (without taking the probe slot).
    pub fn is_available(&self, now: Instant) -> bool {
        match self.lock().state {
            BreakerState::Closed => true,
            BreakerState::Open { until } => now >= until,
            BreakerState::HalfOpen { probing } => !probing,
        }
    }

    /// Lets a request through, taking the probe slot when the worker is on probation.
    pub fn admit(&self, now: Instant) -> Option<Admission> {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::Closed => Some(Admission::Normal),
            BreakerState::Open { until } if now < until => None,
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: false } => {
                inner.state = BreakerState::HalfOpen { probing: true };
                Some(Admission::Probe)
            }
            BreakerState::HalfOpen { probing: true } => None,
        }
    }

    pub fn record_success(&self) {
        let mut inner = self.lock();
        inner.consecutive_failures = 0;
        inner.cooldown = self.policy.first_cooldown;
        inner.state = BreakerState::Closed;
    }

    /// Returns true when this failure ejected the worker.
    pub fn record_failure(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        inner.consecutive_failures += 1;
        let probe_failed = matches!(inner.state, BreakerState::HalfOpen { .. });
        if probe_failed || inner.consecutive_failures >= self.policy.failures_to_open {
            if probe_failed {
                inner.cooldown = (inner.cooldown * 2).min(self.policy.max_cooldown);
            }
            let was_open = matches!(inner.state, BreakerState::Open { .. });
            inner.state = BreakerState::Open { until: now + inner.cooldown };
            return !was_open;
        }
        false
    }

    /// A request that ended without a verdict (client went away) gives the probe slot back.
    pub fn release_probe(&self) {
        let mut inner = self.lock();
        if inner.state == (BreakerState::HalfOpen { probing: true }) {
            inner.state = BreakerState::HalfOpen { probing: false };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerPolicy {
            failures_to_open: 2,
            first_cooldown: Duration::from_secs(1),
            max_cooldown: Duration::from_secs(4),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker();
        let t = Instant::now();
        assert!(!b.record_failure(t));
        b.record_success();
        assert!(!b.record_failure(t));
        assert!(b.record_failure(t), "second consecutive failure ejects");
        assert!(!b.is_available(t));
        assert_eq!(b.admit(t), None);
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let b = breaker();
        let t = Instant::now();
        b.record_failure(t);
        b.record_failure(t);
        let later = t + Duration::from_millis(1001);
        assert!(b.is_available(later));
        assert_eq!(b.admit(later), Some(Admission::Probe));
        assert_eq!(b.admit(later), None, "only one probe at a time");
        b.record_success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn failed_probe_doubles_the_cooldown() {
        let b = breaker();
        let t = Instant::now();
        b.record_failure(t);
        b.record_failure(t);
        let t1 = t + Duration::from_millis(1001);
        b.admit(t1);
        b.record_failure(t1);
        assert!(!b.is_available(t1 + Duration::from_millis(1500)));
        assert!(b.is_available(t1 + Duration::from_millis(2001)));
    }

    #[test]
    fn abandoned_probe_frees_the_slot() {
        let b = breaker();
        let t = Instant::now();
        b.record_failure(t);
        b.record_failure(t);
        let t1 = t + Duration::from_secs(2);
        assert_eq!(b.admit(t1), Some(Admission::Probe));
        b.release_probe();
        assert_eq!(b.admit(t1), Some(Admission::Probe));
    }
}
