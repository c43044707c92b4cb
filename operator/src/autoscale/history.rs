//! Recommendations over time, for stabilization windows: scale up only as far as every
//! recent recommendation agrees, scale down only as far as every recent one allows.

use std::collections::VecDeque;

/// Seconds since some fixed origin; the policy takes time as data so tests drive it.
pub type Seconds = f64;

/// Longest window kept, whatever the spec says (the CRD caps windows at an hour).
const MAX_WINDOW_SECONDS: f64 = 3600.0;

#[derive(Debug, Clone, Default)]
pub struct History {
    entries: VecDeque<(Seconds, i32)>,
}

impl History {
    pub fn record(&mut self, now: Seconds, recommendation: i32) {
        self.entries.push_back((now, recommendation));
        while self.entries.front().is_some_and(|(t, _)| now - t > MAX_WINDOW_SECONDS) {
            self.entries.pop_front();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Lowest recommendation within `window` seconds before `now` (for scaling up).
    pub fn min_within(&self, now: Seconds, window: f64) -> Option<i32> {
        self.within(now, window).min()
    }

    /// Highest recommendation within `window` seconds before `now` (for scaling down).
    pub fn max_within(&self, now: Seconds, window: f64) -> Option<i32> {
        self.within(now, window).max()
    }

    fn within(&self, now: Seconds, window: f64) -> impl Iterator<Item = i32> + '_ {
        self.entries.iter().filter(move |(t, _)| now - t <= window).map(|(_, r)| *r)
    }
}
