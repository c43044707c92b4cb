//! Helpers for unit tests.

use std::sync::Arc;

use dlengine_registry::{Capacity, KvLayout, Load, Role, TransferEndpoints, WorkerRecord, WorkerView, PROTOCOL_VERSION};

use crate::workers::{BreakerPolicy, Worker, WorkerId};

pub fn record(instance_id: &str, model: &str, role: Role) -> WorkerRecord {
    WorkerRecord {
        protocol_version: PROTOCOL_VERSION,
        instance_id: instance_id.into(),
        namespace: "default".into(),
        deployment: "local".into(),
        revision: "0".into(),
        role,
        model: model.into(),
        served_model_name: model.into(),
        url: format!("http://{instance_id}.invalid"),
        kv_layout: KvLayout { layers: 1, kv_heads: 1, head_dim: 8, block_size: 16, dtype: "f32".into() },
        transfer: TransferEndpoints::default(),
        capacity: Capacity { max_seqs: 4, kv_blocks: 16 },
        load: Load::default(),
        started_at: 0,
    }
}

pub fn view_of(records: &[&WorkerRecord]) -> WorkerView {
    records.iter().map(|r| (*r).clone()).collect()
}

/// `n` aggregated workers of model "m", ids 1..=n.
pub fn workers(n: usize) -> Vec<Arc<Worker>> {
    (1..=n)
        .map(|i| {
            let r = record(&format!("w{i}"), "m", Role::Aggregated);
            Arc::new(Worker::new(WorkerId(i as u64), format!("k{i}"), r, BreakerPolicy::default()))
        })
        .collect()
}
