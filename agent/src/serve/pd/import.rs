//! The decode side: checks a descriptor against this engine, picks the transport both
//! sides share, and (for TCP) pulls the KV before the request enters the engine, so a
//! failed transfer is a clean HTTP error the router can retry elsewhere.
//!
//! An early descriptor comes before prefill has sampled the first token. Over CUDA IPC
//! the request enters the engine at once (its copy follows prefill layer by layer) and
//! the token is fetched alongside; over TCP the token is fetched first (the lease's
//! blocks are readable only then), then the KV is pulled.

use std::sync::Arc;

use dlengine_cli::KvTransport;
use dlengine_engine::engine::{Engine, RequestStream};
use dlengine_engine::kv_transfer::{CudaIpcKv, ImportedKv, KvPayload, KvSource, KvTransfer};

use super::descriptor::MigrationDescriptor;
use super::first_token;
use super::release::LeaseRelease;
use super::{tcp, Pd, PULL_TIMEOUT};
use crate::openai::ApiError;

/// A decode request's import, to follow once the request is submitted.
pub struct DecodeImport {
    lease: LeaseRelease,
    /// Early descriptor over CUDA IPC: where the first token is fetched from.
    pending_first_token: Option<(reqwest::Client, String, String)>,
}

impl DecodeImport {
    /// Starts fetching the first token if it is still to come; returns the lease to hold
    /// until the engine's first event for `stream`.
    pub fn follow(self, stream: &RequestStream) -> LeaseRelease {
        if let Some((client, url, lease_id)) = self.pending_first_token {
            let sink = stream.first_token_sink();
            tokio::spawn(async move { sink.provide(first_token::fetch(&client, &url, &lease_id).await) });
        }
        self.lease
    }
}

enum Transport<'a> {
    CudaIpc(&'a CudaIpcKv),
    Tcp(&'a str),
}

/// The engine's view of the imported KV, and what to do once the request is submitted.
pub async fn import_kv(
    pd: &Pd,
    engine: &Engine,
    served_model: &str,
    prompt: &[u32],
    descriptor: &MigrationDescriptor,
) -> Result<(KvTransfer, DecodeImport), ApiError> {
    descriptor.check_compatible(served_model, engine.info(), prompt)?;
    let mut release = LeaseRelease::new(pd.client.clone(), descriptor.free_url.clone(), descriptor.lease_id.clone());
    let mut first_token = descriptor.first_token.clone();
    let mut pending_first_token = None;
    let source = match choose(pd, engine, descriptor)? {
        Transport::CudaIpc(peer) => {
            if first_token.is_none() {
                pending_first_token = Some((pd.client.clone(), descriptor.first_token_url.clone(), descriptor.lease_id.clone()));
            }
            let remote_blocks = descriptor.blocks.clone();
            KvSource::CudaIpc { peer: Arc::new(peer.clone()), remote_blocks, ready_mark: descriptor.ready_mark }
        }
        Transport::Tcp(addr) => {
            if first_token.is_none() {
                let token = first_token::fetch(&pd.client, &descriptor.first_token_url, &descriptor.lease_id).await;
                first_token = Some(token.map_err(|e| transfer_failed(format!("fetching prefill's first token: {e}")))?);
            }
            let expected = descriptor.blocks.len() * engine.info().kv_layout.bytes_per_block();
            // Prefill's own clock decides whether the lease is still valid (it answers
            // "unknown or expired KV lease"); a timeout derived from the descriptor's expiry
            // would trust two clocks to agree and race an already-expired lease.
            let bytes = tcp::pull(addr, &descriptor.lease_id, expected, PULL_TIMEOUT).await.map_err(|e| transfer_failed(format!("{e:#}")))?;
            release.forget(); // prefill frees the lease itself once the pull is complete
            KvSource::Host(Arc::new(KvPayload { num_blocks: descriptor.blocks.len(), bytes }))
        }
    };
    Ok((KvTransfer::Import(ImportedKv { first_token, source }), DecodeImport { lease: release, pending_first_token }))
}

/// CUDA IPC when both processes share a node (and not a GPU), else TCP; `--kv-transport`
/// narrows the choice.
fn choose<'a>(pd: &Pd, engine: &Engine, d: &'a MigrationDescriptor) -> Result<Transport<'a>, ApiError> {
    let ipc = match (&d.cuda_ipc, engine.kv_ipc()) {
        (Some(theirs), Some(ours)) if d.node == pd.endpoint.node && theirs.device != ours.device => Some(theirs),
        _ => None,
    };
    let tcp = d.tcp.as_deref();
    match (pd.transport, ipc, tcp) {
        (KvTransport::Auto | KvTransport::CudaIpc, Some(peer), _) => Ok(Transport::CudaIpc(peer)),
        (KvTransport::Auto | KvTransport::Tcp, _, Some(addr)) => Ok(Transport::Tcp(addr)),
        (KvTransport::CudaIpc, None, _) => Err(transfer_failed(
            "--kv-transport cuda-ipc, but prefill is not on this node or another GPU of it (or has no CUDA IPC export)".into(),
        )),
        _ => Err(transfer_failed("prefill offers no KV transport this engine can use".into())),
    }
}

fn transfer_failed(message: String) -> ApiError {
    ApiError::unavailable(format!("pulling the prompt's KV cache from prefill failed: {message}")).with_code("kv_transfer_failed")
}
