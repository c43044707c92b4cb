//! Prefill/decode disaggregation on the engine side (docs/disaggregation.md):
//! `kv_transfer_params` in requests and answers, the KV transports, and `POST /pd/free`.
//!
//! A prefill engine answers a `{"do_remote_decode": true}` request after its first token
//! with a [`MigrationDescriptor`]; a decode engine given that descriptor pulls the KV
//! (CUDA IPC on one node, TCP anywhere), releases prefill's lease and generates the rest.

mod descriptor;
mod first_token;
mod free;
mod handoff;
mod import;
mod params;
mod release;
mod tcp;

use std::time::Duration;

use anyhow::Context;
use dlengine_cli::{KvTransport, ServeArgs};
use dlengine_engine::engine::Engine;
use dlengine_engine::kv_transfer::KvTransfer;
use dlengine_engine::request::GenerateRequest;
use dlengine_registry::{Identity, TransferEndpoints};

use crate::openai::ApiError;

pub use descriptor::PrefillEndpoint;
pub use first_token::first_token;
pub use free::free_lease;
pub use handoff::{answer, Handoff, PrefillOrder};
use import::import_kv;
pub use import::DecodeImport;
pub use params::KvParams;
pub use release::LeaseRelease;

/// How long a decode engine waits for prefill's KV at most (the lease bounds it too).
const PULL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `POST /pd/free` may take.
const FREE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one engine process knows about disaggregation.
pub struct Pd {
    pub endpoint: PrefillEndpoint,
    transport: KvTransport,
    client: reqwest::Client,
}

impl Pd {
    /// Starts the TCP KV listener (every engine has one: any engine may be asked to
    /// prefill) and gathers what descriptors advertise.
    pub async fn start(args: &ServeArgs, engine: &Engine, served_model: &str, identity: &Identity) -> anyhow::Result<Pd> {
        let self_url = &identity.advertise_url;
        if args.transfer.require_rdma || args.transfer.kv_transport == KvTransport::Rdma {
            anyhow::bail!(
                "--kv-transport rdma / --require-rdma: this build moves KV over TCP and CUDA IPC only; the RDMA verbs \
                 transport (crate dlengine-kv-rdma) is not wired into serving yet. Use --kv-transport auto|tcp|cuda-ipc"
            );
        }
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.transfer.kv_transfer_port))
            .await
            .with_context(|| format!("binding the KV transfer listener on {}:{}", args.host, args.transfer.kv_transfer_port))?;
        let port = listener.local_addr()?.port();
        tokio::spawn(tcp::serve(listener, engine.clone()));
        let host = url_host(self_url);
        let endpoint = PrefillEndpoint {
            engine_id: identity.instance_id.clone(),
            model: served_model.to_owned(),
            free_url: format!("{self_url}/pd/free"),
            first_token_url: format!("{self_url}/pd/first_token"),
            node: gethostname::gethostname().to_string_lossy().into_owned(),
            tcp: Some(format!("{host}:{port}")),
            cuda_ipc: engine.kv_ipc().cloned(),
        };
        tracing::info!(tcp = ?endpoint.tcp, cuda_ipc = endpoint.cuda_ipc.is_some(), "KV transfer ready");
        let client = reqwest::Client::builder().timeout(FREE_TIMEOUT).build().context("building the HTTP client")?;
        Ok(Pd { endpoint, transport: args.transfer.kv_transport, client })
    }

    /// Applies `kv_transfer_params` to a request about to be submitted: prefill hands its
    /// KV off, decode imports it (over TCP, pulled right here). The returned import must
    /// be followed once the request is submitted.
    pub async fn apply(
        &self,
        engine: &Engine,
        served_model: &str,
        params: &KvParams,
        request: &mut GenerateRequest,
    ) -> Result<Option<DecodeImport>, ApiError> {
        match params {
            KvParams::None => Ok(None),
            KvParams::RemoteDecode { early } => {
                request.kv_transfer = if *early { KvTransfer::ExportEarly } else { KvTransfer::Export };
                Ok(None)
            }
            KvParams::Continue(descriptor) => {
                let (transfer, lease) = import_kv(self, engine, served_model, &request.prompt_token_ids, descriptor).await?;
                request.kv_transfer = transfer;
                Ok(Some(lease))
            }
        }
    }

    /// What the registry record advertises.
    pub fn transfer_endpoints(&self) -> TransferEndpoints {
        TransferEndpoints {
            tcp: self.endpoint.tcp.clone(),
            cuda_ipc: self.endpoint.cuda_ipc.as_ref().map(|c| format!("{}@{}", c.device, self.endpoint.node)),
            rdma: None,
        }
    }
}

/// `http://host:port` → `host` (brackets kept for IPv6).
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => authority[..i].to_owned(),
        _ => authority.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::url_host;

    #[test]
    fn the_host_of_an_advertised_url() {
        assert_eq!(url_host("http://10.0.0.5:8000"), "10.0.0.5");
        assert_eq!(url_host("http://[::1]:80/x"), "[::1]");
        assert_eq!(url_host("http://svc"), "svc");
    }
}
