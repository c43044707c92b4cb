//! An in-memory registry with etcd's prefix semantics, for controller tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{DeleteFuture, RegistryCleaner, RegistryError, RegistryTarget};

#[derive(Debug, Default)]
pub struct MemoryRegistry {
    keys: Mutex<BTreeMap<String, String>>,
    /// When set, deletions fail with this message (to test finalizer retries).
    failure: Mutex<Option<String>>,
}

impl MemoryRegistry {
    pub fn put(&self, key: &str, value: &str) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.insert(key.into(), value.into());
        }
    }

    pub fn keys(&self) -> Vec<String> {
        self.keys.lock().map(|k| k.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn fail_with(&self, message: Option<&str>) {
        if let Ok(mut failure) = self.failure.lock() {
            *failure = message.map(str::to_string);
        }
    }

    fn delete_prefix(&self, prefix: &str) -> Result<u64, RegistryError> {
        let failure = self.failure.lock().ok().and_then(|f| f.clone());
        if let Some(message) = failure {
            return Err(RegistryError::Delete { prefix: prefix.into(), message });
        }
        let mut keys = self.keys.lock().map_err(|_| RegistryError::Delete { prefix: prefix.into(), message: "lock poisoned".into() })?;
        let before = keys.len();
        keys.retain(|k, _| !k.starts_with(prefix));
        Ok((before - keys.len()) as u64)
    }
}

impl RegistryCleaner for MemoryRegistry {
    fn delete_deployment<'a>(&'a self, target: &'a RegistryTarget) -> DeleteFuture<'a> {
        Box::pin(async move { self.delete_prefix(&target.prefix()) })
    }
}
