//! The few engine metrics the autoscaler reads, from Prometheus text exposition.
//!
//! Metric names are the contract with the engines (docs/operator.md lists them).

use std::collections::BTreeMap;

pub const QUEUE_DEPTH: &str = "dlengine_num_requests_waiting";
pub const KV_CACHE_UTILIZATION: &str = "dlengine_kv_cache_usage_ratio";
pub const TTFT: &str = "dlengine_time_to_first_token_seconds";
pub const ITL: &str = "dlengine_inter_token_latency_seconds";

/// Cumulative bucket counts by upper bound, as exposed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Observations since `earlier` (counters only grow; a restart resets them).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let restarted = self.total() < earlier.total();
        if restarted || self.buckets.len() != earlier.buckets.len() {
            return self.clone();
        }
        let buckets = self.buckets.iter().zip(&earlier.buckets).map(|((le, now), (_, then))| (*le, (now - then).max(0.0))).collect();
        Histogram { buckets }
    }

    pub fn total(&self) -> f64 {
        self.buckets.last().map(|(_, c)| *c).unwrap_or(0.0)
    }

    /// Upper bound of the bucket holding quantile `q`; None without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.total();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut previous_bound = 0.0;
        for (le, count) in &self.buckets {
            if *count >= rank {
                return Some(if le.is_infinite() { previous_bound } else { *le });
            }
            previous_bound = *le;
        }
        Some(previous_bound)
    }
}

/// One engine's scrape.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EngineSample {
    pub queue_depth: Option<f64>,
    pub kv_cache_utilization: Option<f64>,
    pub ttft: Histogram,
    pub itl: Histogram,
}

pub fn parse(text: &str) -> EngineSample {
    let mut sample = EngineSample::default();
    let mut ttft = BTreeMap::new();
    let mut itl = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let Some((name, labels, value)) = split_line(line) else { continue };
        match name {
            QUEUE_DEPTH => *sample.queue_depth.get_or_insert(0.0) += value,
            KV_CACHE_UTILIZATION => sample.kv_cache_utilization = Some(value),
            n if n == format!("{TTFT}_bucket") => add_bucket(&mut ttft, labels, value),
            n if n == format!("{ITL}_bucket") => add_bucket(&mut itl, labels, value),
            _ => {}
        }
    }
    sample.ttft = to_histogram(ttft);
    sample.itl = to_histogram(itl);
    sample
}

fn split_line(line: &str) -> Option<(&str, &str, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    match series.split_once('{') {
        Some((name, rest)) => Some((name, rest.trim_end_matches('}'), value)),
        None => Some((series, "", value)),
    }
}

/// Buckets keyed by their bound's bits so that `+Inf` sorts last; series that differ in
/// other labels (model, finish reason) are summed.
fn add_bucket(buckets: &mut BTreeMap<u64, (f64, f64)>, labels: &str, value: f64) {
    let Some(le) = labels.split(',').find_map(|kv| kv.trim().strip_prefix("le=")) else { return };
    let bound = match le.trim_matches('"') {
        "+Inf" | "Inf" => f64::INFINITY,
        other => match other.parse::<f64>() {
            Ok(v) => v,
            Err(_) => return,
        },
    };
    let entry = buckets.entry(order_key(bound)).or_insert((bound, 0.0));
    entry.1 += value;
}

fn order_key(bound: f64) -> u64 {
    // Positive finite floats and +Inf order like their bit patterns.
    bound.max(0.0).to_bits()
}

fn to_histogram(buckets: BTreeMap<u64, (f64, f64)>) -> Histogram {
    Histogram { buckets: buckets.into_values().collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
# HELP dlengine_num_requests_waiting Requests waiting for a slot.
# TYPE dlengine_num_requests_waiting gauge
dlengine_num_requests_waiting{model="m"} 7
dlengine_kv_cache_usage_ratio 0.5
dlengine_time_to_first_token_seconds_bucket{model="m",le="0.1"} 50
dlengine_time_to_first_token_seconds_bucket{model="m",le="0.5"} 90
dlengine_time_to_first_token_seconds_bucket{model="m",le="1"} 99
dlengine_time_to_first_token_seconds_bucket{model="m",le="+Inf"} 100
dlengine_time_to_first_token_seconds_count{model="m"} 100
"#;

    #[test]
    fn gauges_and_histograms_are_read() {
        let s = parse(TEXT);
        assert_eq!(s.queue_depth, Some(7.0));
        assert_eq!(s.kv_cache_utilization, Some(0.5));
        assert_eq!(s.ttft.quantile(0.95), Some(1.0));
        assert_eq!(s.ttft.quantile(0.5), Some(0.1));
        assert_eq!(s.itl.quantile(0.95), None);
    }

    #[test]
    fn quantiles_use_only_new_observations() {
        let before = parse(TEXT).ttft;
        let mut now = before.clone();
        for (le, count) in now.buckets.iter_mut() {
            // 100 new observations, all slow.
            *count += if le.is_infinite() || *le >= 1.0 { 100.0 } else { 0.0 };
        }
        assert_eq!(now.since(&before).quantile(0.25), Some(1.0));
        assert_eq!(now.quantile(0.25), Some(0.1), "the cumulative view would hide the slowdown");
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let s = parse("not a metric\ndlengine_kv_cache_usage_ratio abc\n");
        assert_eq!(s, EngineSample::default());
    }
}
