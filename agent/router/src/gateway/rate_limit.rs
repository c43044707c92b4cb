//! Per-client token buckets: `rate` requests per second with a burst of one second's worth
//! (at least one request). The client is its API key, or its IP address when no keys are
//! configured.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept before idle full ones are dropped.
const MAX_TRACKED_CLIENTS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `None` when `rate` is 0 (unlimited).
    pub fn new(rate: f64) -> Option<RateLimiter> {
        (rate > 0.0).then(|| RateLimiter { rate, burst: rate.max(1.0), buckets: Mutex::new(HashMap::new()) })
    }

    /// Takes a token, or says after how many whole seconds one will be there.
    pub fn acquire(&self, client: &str, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED_CLIENTS && !buckets.contains_key(client) {
            self.drop_full_buckets(&mut buckets, now);
        }
        let bucket = buckets.entry(client.to_string()).or_insert(Bucket { tokens: self.burst, refilled_at: now });
        let elapsed = now.saturating_duration_since(bucket.refilled_at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate;
            Err(wait.ceil().max(1.0) as u64)
        }
    }

    fn drop_full_buckets(&self, buckets: &mut HashMap<String, Bucket>, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.refilled_at).as_secs_f64() * rate < burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_the_burst_then_refuses_with_a_wait() {
        let limiter = RateLimiter::new(2.0).unwrap();
        let t = Instant::now();
        assert!(limiter.acquire("k", t).is_ok());
        assert!(limiter.acquire("k", t).is_ok());
        assert_eq!(limiter.acquire("k", t), Err(1));
        // Another client has its own bucket.
        assert!(limiter.acquire("other", t).is_ok());
        // Half a second refills one token at 2/s.
        assert!(limiter.acquire("k", t + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn slow_rates_report_longer_waits() {
        let limiter = RateLimiter::new(0.25).unwrap();
        let t = Instant::now();
        assert!(limiter.acquire("k", t).is_ok());
        assert_eq!(limiter.acquire("k", t), Err(4));
    }

    #[test]
    fn zero_means_unlimited() {
        assert!(RateLimiter::new(0.0).is_none());
    }
}
