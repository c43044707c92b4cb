//! The set of registered engines as last seen in etcd, keyed by their registry key.

use std::collections::BTreeMap;

use crate::key::RegistryKey;
use crate::record::{WorkerRecord, PROTOCOL_VERSION};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerView {
    workers: BTreeMap<String, WorkerRecord>,
    /// The etcd revision this view reflects.
    revision: i64,
}

impl WorkerView {
    pub fn workers(&self) -> impl Iterator<Item = (&str, &WorkerRecord)> {
        self.workers.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get(&self, key: &str) -> Option<&WorkerRecord> {
        self.workers.get(key)
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    pub(crate) fn set_revision(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
    }

    /// Applies a put; a value that is not a record this router understands removes
    /// whatever was there (the engine behind it changed into something we cannot use).
    pub(crate) fn put(&mut self, key: &str, value: &[u8]) {
        match parse_record(key, value) {
            Ok(record) => {
                self.workers.insert(key.to_string(), record);
            }
            Err(reason) => {
                tracing::warn!(key, "registry: ignoring registration: {reason}");
                self.workers.remove(key);
            }
        }
    }

    pub(crate) fn delete(&mut self, key: &str) {
        self.workers.remove(key);
    }
}

/// A view built from records directly (tests, tools); keys are the records' own.
impl FromIterator<WorkerRecord> for WorkerView {
    fn from_iter<I: IntoIterator<Item = WorkerRecord>>(records: I) -> Self {
        let workers = records.into_iter().map(|r| (RegistryKey::of_record(&r).render(), r)).collect();
        WorkerView { workers, revision: 0 }
    }
}

fn parse_record(key: &str, value: &[u8]) -> Result<WorkerRecord, String> {
    let parsed_key = RegistryKey::parse(key).ok_or("key does not follow the registry layout")?;
    let record: WorkerRecord = serde_json::from_slice(value).map_err(|e| format!("value is not a worker record: {e}"))?;
    if record.protocol_version != PROTOCOL_VERSION {
        return Err(format!("protocol version {} (this router speaks {PROTOCOL_VERSION})", record.protocol_version));
    }
    if parsed_key != RegistryKey::of_record(&record) {
        return Err("the record's identity does not match its key".into());
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::sample_record;

    const KEY: &str = "/dlengine/default/local/0/aggregated/a";

    #[test]
    fn put_update_and_delete() {
        let mut view = WorkerView::default();
        let mut record = sample_record("a", "http://a");
        view.put(KEY, record.to_json().as_bytes());
        assert_eq!(view.get(KEY), Some(&record));
        record.load.running = 3;
        view.put(KEY, record.to_json().as_bytes());
        assert_eq!(view.get(KEY).map(|r| r.load.running), Some(3));
        view.delete(KEY);
        assert!(view.is_empty());
    }

    #[test]
    fn unusable_values_remove_the_worker() {
        let mut view = WorkerView::default();
        view.put(KEY, sample_record("a", "http://a").to_json().as_bytes());
        view.put(KEY, b"not json");
        assert!(view.is_empty());
        let mut future = sample_record("a", "http://a");
        future.protocol_version = PROTOCOL_VERSION + 1;
        view.put(KEY, future.to_json().as_bytes());
        assert!(view.is_empty());
        // A record filed under another engine's key.
        view.put(KEY, sample_record("b", "http://b").to_json().as_bytes());
        assert!(view.is_empty());
    }
}
