//! The leases that exist and what of them may be read, for readers off the engine thread
//! ([`crate::kv_transfer::HostKvReader`]). The engine thread's [`super::LeaseTable`] keeps
//! it in step: an entry appears when a lease is reserved or pinned and goes before the
//! lease's blocks are freed. Lease ids never repeat, so a reader that still finds its lease
//! here once its read is over knows the blocks were not given to anyone meanwhile: the
//! bytes it read are the lease's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::kv_transfer::LeaseExtent;

#[derive(Debug, Clone, Default)]
pub struct LeaseDirectory(Arc<Mutex<HashMap<u64, LeaseExtent>>>);

impl LeaseDirectory {
    pub fn get(&self, id: u64) -> Option<LeaseExtent> {
        self.lock().get(&id).cloned()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.lock().contains_key(&id)
    }

    pub(super) fn insert(&self, id: u64, extent: LeaseExtent) {
        self.lock().insert(id, extent);
    }

    pub(super) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, LeaseExtent>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
