//! The decode side: checks a descriptor against this engine, picks the transport both
//! sides share, and says where the engine gets the KV from. The request enters the
//! engine before its KV has arrived; a failed transfer fails it before any byte of the
//! answer, a clean HTTP error the router can retry elsewhere.
//!
//! An early descriptor comes before prefill has sampled the first token. Over CUDA IPC
//! the copy follows prefill layer by layer and the token is fetched alongside; over TCP
//! the pull brings the token among the layers (which prefill sends as its forward writes
//! them, on a GPU). Over RDMA the token is fetched first (the READs may start only once
//! the lease's blocks are complete).

use std::sync::Arc;

use dlengine_cli::KvTransport;
use dlengine_engine::engine::{Engine, RequestStream};
use dlengine_engine::kv_transfer::{CudaIpcKv, ImportedKv, KvSource, KvTransfer, StreamedKv};

use super::descriptor::MigrationDescriptor;
use super::first_token;
use super::release::LeaseRelease;
use super::tcp::{self, PullPlan};
use super::{Pd, PULL_TIMEOUT};
use crate::openai::ApiError;

/// A decode request's import, to follow once the request is submitted.
pub struct DecodeImport {
    lease: LeaseRelease,
    then: FollowUp,
}

/// What the engine will wait for once the request is in.
enum FollowUp {
    Nothing,
    /// Early descriptor over CUDA IPC or layer-wise RDMA: prefill's first token, fetched
    /// from this URL.
    FetchFirstToken { client: reqwest::Client, url: String, lease_id: String },
    /// TCP: the pull that feeds the engine's frames, and the first token too if the
    /// descriptor came early.
    Pull { plan: PullPlan, frames: Arc<StreamedKv>, brings_first_token: bool },
}

impl FollowUp {
    /// Fetching prefill's first token of `descriptor`'s lease while the KV is copied.
    fn fetch_first_token(pd: &Pd, descriptor: &MigrationDescriptor) -> Self {
        Self::FetchFirstToken { client: pd.client.clone(), url: descriptor.first_token_url.clone(), lease_id: descriptor.lease_id.clone() }
    }
}

impl DecodeImport {
    /// Starts what the engine waits for; returns the lease to hold until the engine's
    /// first event for `stream`.
    pub fn follow(self, stream: &RequestStream) -> LeaseRelease {
        match self.then {
            FollowUp::Nothing => {}
            FollowUp::FetchFirstToken { client, url, lease_id } => {
                let sink = stream.first_token_sink();
                tokio::spawn(async move { sink.provide(first_token::fetch(&client, &url, &lease_id).await) });
            }
            FollowUp::Pull { plan, frames, brings_first_token } => {
                let sink = brings_first_token.then(|| stream.first_token_sink());
                tokio::spawn(tcp::pull(plan, frames, sink, PULL_TIMEOUT));
            }
        }
        self.lease
    }
}

enum Transport<'a> {
    CudaIpc(&'a CudaIpcKv),
    Rdma(&'a str),
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
    let lease = LeaseRelease::new(pd.client.clone(), descriptor.free_url.clone(), descriptor.lease_id.clone());
    let transport = choose(pd, engine, descriptor)?;
    let mut first_token = descriptor.first_token.clone();
    let early = first_token.is_none();
    let (source, then) = match transport {
        Transport::Rdma(connect_url) => {
            let rdma = pd.rdma.as_ref().expect("chosen only when this engine has RDMA");
            let reader = rdma.reader(&pd.client, &pd.endpoint.engine_id, &descriptor.engine_id, connect_url).await;
            let reader = reader.map_err(|e| transfer_failed(format!("connecting to prefill over RDMA: {e}")))?;
            // Early: READ each layer as prefill's marks say it is written, the token
            // fetched meanwhile; where prefill publishes no marks, the lease's blocks are
            // complete only once the token is sampled.
            let ready_mark = descriptor.ready_mark.filter(|_| early && reader.follows_progress());
            let then = match ready_mark {
                Some(_) => FollowUp::fetch_first_token(pd, descriptor),
                None if early => {
                    first_token = Some(fetch_first_token(pd, descriptor).await?);
                    FollowUp::Nothing
                }
                None => FollowUp::Nothing,
            };
            (KvSource::Remote { reader: Arc::new(reader), remote_blocks: descriptor.blocks.clone(), ready_mark }, then)
        }
        Transport::CudaIpc(peer) => {
            let remote_blocks = descriptor.blocks.clone();
            let source = KvSource::CudaIpc { peer: Arc::new(peer.clone()), remote_blocks, ready_mark: descriptor.ready_mark };
            (source, if early { FollowUp::fetch_first_token(pd, descriptor) } else { FollowUp::Nothing })
        }
        Transport::Tcp(addr) => {
            let blocks = descriptor.blocks.len();
            let frames = engine.streamed_kv(blocks, "tcp");
            // Prefill's own clock decides whether the lease is still valid (it answers
            // "unknown or expired KV lease"); a timeout derived from the descriptor's expiry
            // would trust two clocks to agree and race an already-expired lease.
            let plan = PullPlan::new(addr, &descriptor.lease_id, &engine.info().kv_layout, blocks, pd.tcp_connections);
            (KvSource::Streamed(frames.clone()), FollowUp::Pull { plan, frames, brings_first_token: early })
        }
    };
    Ok((KvTransfer::Import(ImportedKv { first_token, source }), DecodeImport { lease, then }))
}

async fn fetch_first_token(pd: &Pd, descriptor: &MigrationDescriptor) -> Result<dlengine_engine::request::TokenLogprob, ApiError> {
    let token = first_token::fetch(&pd.client, &descriptor.first_token_url, &descriptor.lease_id).await;
    token.map_err(|e| transfer_failed(format!("fetching prefill's first token: {e}")))
}

/// What both sides of a transfer offer.
struct Offers<'a> {
    /// Prefill's CUDA IPC export, if it is on this node and another GPU of it.
    cuda_ipc: Option<&'a CudaIpcKv>,
    /// Prefill's RDMA connect URL, if both engines move KV over RDMA.
    rdma: Option<&'a str>,
    tcp: Option<&'a str>,
}

fn choose<'a>(pd: &Pd, engine: &Engine, d: &'a MigrationDescriptor) -> Result<Transport<'a>, ApiError> {
    let cuda_ipc = match (&d.cuda_ipc, engine.kv_ipc()) {
        (Some(theirs), Some(ours)) if d.node == pd.endpoint.node && theirs.device != ours.device => Some(theirs),
        _ => None,
    };
    let rdma = d.rdma_connect_url.as_deref().filter(|_| pd.rdma.is_some());
    pick(pd.transport, pd.require_rdma, Offers { cuda_ipc, rdma, tcp: d.tcp.as_deref() })
}

/// The fastest transport both sides offer: CUDA IPC on one node, then RDMA, then TCP;
/// `--kv-transport` narrows the choice, `--require-rdma` rules TCP out.
fn pick(transport: KvTransport, require_rdma: bool, offers: Offers<'_>) -> Result<Transport<'_>, ApiError> {
    use KvTransport::{Auto, CudaIpc, Rdma, Tcp};
    match (transport, offers.cuda_ipc, offers.rdma, offers.tcp) {
        (Auto | CudaIpc, Some(peer), _, _) => Ok(Transport::CudaIpc(peer)),
        (Auto | Rdma, _, Some(url), _) => Ok(Transport::Rdma(url)),
        (Auto | Tcp, _, _, Some(addr)) if !require_rdma => Ok(Transport::Tcp(addr)),
        (CudaIpc, None, _, _) => Err(transfer_failed(
            "--kv-transport cuda-ipc, but prefill is not on this node or another GPU of it (or has no CUDA IPC export)".into(),
        )),
        (Auto | Rdma, _, None, _) if require_rdma || transport == Rdma => {
            Err(transfer_failed("RDMA is required (--kv-transport rdma / --require-rdma), but prefill moves no KV over RDMA".into()))
        }
        _ => Err(transfer_failed("prefill offers no KV transport this engine can use".into())),
    }
}

/// The prompt's KV did not reach this engine: a 503 the router retries on another pair.
pub fn transfer_failed(message: String) -> ApiError {
    ApiError::unavailable(format!("the prompt's KV cache did not arrive from prefill: {message}")).with_code("kv_transfer_failed")
}

#[cfg(test)]
mod tests {
    use dlengine_cli::KvTransport::{self, Auto, CudaIpc, Rdma, Tcp};
    use dlengine_engine::kv_transfer::CudaIpcKv;

    use super::{pick, Offers, Transport};

    fn ipc() -> CudaIpcKv {
        CudaIpcKv { device: "0000:01:00.0".into(), pid: 1, k_handles: vec![], v_handles: vec![], progress: None }
    }

    fn picked(transport: KvTransport, require_rdma: bool, ipc: Option<&CudaIpcKv>, rdma: bool) -> Result<&'static str, String> {
        let offers = Offers { cuda_ipc: ipc, rdma: rdma.then_some("http://p/pd/rdma/connect"), tcp: Some("p:1") };
        match pick(transport, require_rdma, offers) {
            Ok(Transport::CudaIpc(_)) => Ok("cuda-ipc"),
            Ok(Transport::Rdma(_)) => Ok("rdma"),
            Ok(Transport::Tcp(_)) => Ok("tcp"),
            Err(e) => Err(e.message),
        }
    }

    #[test]
    fn auto_picks_the_fastest_transport_both_sides_offer() {
        let peer = ipc();
        assert_eq!(picked(Auto, false, Some(&peer), true), Ok("cuda-ipc"));
        assert_eq!(picked(Auto, false, None, true), Ok("rdma"));
        assert_eq!(picked(Auto, false, None, false), Ok("tcp"));
    }

    #[test]
    fn an_explicit_transport_is_used_or_refused_never_swapped() {
        let peer = ipc();
        assert_eq!(picked(Tcp, false, Some(&peer), true), Ok("tcp"));
        assert_eq!(picked(Rdma, false, Some(&peer), true), Ok("rdma"));
        assert!(picked(Rdma, false, None, false).unwrap_err().contains("RDMA is required"));
        assert!(picked(CudaIpc, false, None, true).unwrap_err().contains("--kv-transport cuda-ipc"));
    }

    #[test]
    fn require_rdma_rules_out_tcp_but_not_a_same_node_copy() {
        let peer = ipc();
        assert_eq!(picked(Auto, true, Some(&peer), false), Ok("cuda-ipc"));
        assert_eq!(picked(Auto, true, None, true), Ok("rdma"));
        assert!(picked(Auto, true, None, false).unwrap_err().contains("RDMA is required"));
    }
}
