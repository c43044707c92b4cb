//! The few lines `dlengine serve` needs: a record and a load reader built from a running
//! engine (feature `engine`).

use std::sync::Arc;

use dlengine_cli::RegistryArgs;
use dlengine_engine::backend::KvCacheLayout;
use dlengine_engine::engine::Engine;

use crate::error::RegistryError;
use crate::identity::Identity;
use crate::record::{unix_millis_now, Capacity, KvLayout, Load, TransferEndpoints, WorkerRecord, PROTOCOL_VERSION};
use crate::registrar::{Registrar, RegistrarConfig, RegistrarHandle};

/// Starts registration for a served engine; `Ok(None)` when no etcd endpoints are set.
/// `identity` comes from [`Identity::from_args`] with the address the HTTP server bound;
/// `transfer` is where peers pull KV from. Nothing is written before
/// [`RegistrarHandle::mark_ready`]; call [`RegistrarHandle::shutdown`] on SIGTERM before
/// draining.
pub fn register_engine(
    args: &RegistryArgs,
    identity: &Identity,
    model: &str,
    served_model_name: &str,
    engine: &Engine,
    transfer: TransferEndpoints,
) -> Result<Option<RegistrarHandle>, RegistryError> {
    let Some(config) = RegistrarConfig::from_args(args)? else { return Ok(None) };
    let record = engine_record(identity, model, served_model_name, engine, transfer);
    let engine = engine.clone();
    let load = Arc::new(move || engine_load(&engine));
    Ok(Some(Registrar::spawn(config, record, load)))
}

fn engine_record(identity: &Identity, model: &str, served_model_name: &str, engine: &Engine, transfer: TransferEndpoints) -> WorkerRecord {
    let info = engine.info();
    WorkerRecord {
        protocol_version: PROTOCOL_VERSION,
        instance_id: identity.instance_id.clone(),
        namespace: identity.namespace.clone(),
        deployment: identity.deployment.clone(),
        revision: identity.revision.clone(),
        role: identity.role,
        model: model.to_string(),
        served_model_name: served_model_name.to_string(),
        url: identity.advertise_url.clone(),
        kv_layout: KvLayout::from(&info.kv_layout),
        transfer,
        capacity: Capacity { max_seqs: engine.config().max_num_seqs, kv_blocks: info.num_kv_blocks },
        load: engine_load(engine),
        started_at: unix_millis_now(),
    }
}

impl From<&KvCacheLayout> for KvLayout {
    fn from(l: &KvCacheLayout) -> Self {
        KvLayout { layers: l.num_layers, kv_heads: l.kv_heads, head_dim: l.head_dim, block_size: l.block_size, dtype: l.dtype.name().to_string() }
    }
}

fn engine_load(engine: &Engine) -> Load {
    let stats = engine.stats();
    Load {
        running: stats.running_seqs,
        waiting: stats.waiting_requests,
        kv_usage: stats.kv_usage(),
        updated_at: unix_millis_now(),
    }
}
