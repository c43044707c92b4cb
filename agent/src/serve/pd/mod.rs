//! Prefill/decode disaggregation on the engine side (docs/disaggregation.md):
//! `kv_transfer_params` in requests and answers, the KV transports, and `POST /pd/free`.
//!
//! A prefill engine answers a `{"do_remote_decode": true}` request after its first token
//! with a [`MigrationDescriptor`]; a decode engine given that descriptor pulls the KV
//! (CUDA IPC on one node, RDMA where both have a device, TCP anywhere), releases
//! prefill's lease and generates the rest.

mod descriptor;
mod first_token;
mod free;
mod handoff;
mod import;
mod params;
mod peer_call;
mod rdma;
mod release;
mod tcp;

use std::time::Duration;

use anyhow::Context;
use dlengine_cli::{KvTransport, ServeArgs};
use dlengine_engine::engine::Engine;
use dlengine_engine::kv_transfer::KvTransfer;
use dlengine_engine::request::GenerateRequest;
use dlengine_kv_rdma::RDMA_COMPILED;
use dlengine_registry::{Identity, TransferEndpoints};

use crate::openai::ApiError;

pub use descriptor::PrefillEndpoint;
pub use first_token::first_token;
pub use free::free_lease;
pub use handoff::{answer, Handoff, PrefillOrder};
use import::import_kv;
pub use import::{transfer_failed, DecodeImport};
pub use params::KvParams;
pub use rdma::rdma_connect;
use rdma::RdmaKv;
pub use release::LeaseRelease;

/// How long a decode engine waits for prefill's KV at most (the lease bounds it too).
const PULL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `POST /pd/free` may take.
const FREE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one engine process knows about disaggregation.
pub struct Pd {
    pub endpoint: PrefillEndpoint,
    transport: KvTransport,
    require_rdma: bool,
    rdma: Option<RdmaKv>,
    /// Connections a TCP pull is spread over.
    tcp_connections: usize,
    /// For prefill's `/pd/*` endpoints; sends this engine's API key (one deployment
    /// shares one key).
    client: reqwest::Client,
}

impl Pd {
    /// Starts the TCP KV listener (every engine has one: any engine may be asked to
    /// prefill) and gathers what descriptors advertise.
    pub async fn start(args: &ServeArgs, engine: &Engine, served_model: &str, identity: &Identity) -> anyhow::Result<Pd> {
        let self_url = &identity.advertise_url;
        let rdma = open_rdma(args, engine).await?;
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
            rdma_connect_url: rdma.as_ref().map(|_| format!("{self_url}/pd/rdma/connect")),
        };
        tracing::info!(tcp = ?endpoint.tcp, cuda_ipc = endpoint.cuda_ipc.is_some(), rdma = rdma.is_some(), "KV transfer ready");
        let client = client(args.api_key.as_deref())?;
        let transfer = &args.transfer;
        let tcp_connections = transfer.kv_tcp_connections as usize;
        Ok(Pd { endpoint, transport: transfer.kv_transport, require_rdma: transfer.require_rdma, rdma, tcp_connections, client })
    }

    /// Applies `kv_transfer_params` to a request about to be submitted: prefill hands its
    /// KV off, decode imports it. The returned import must be followed once the request
    /// is submitted (that starts the transfers the engine waits for).
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
            rdma: self.rdma.as_ref().map(|r| format!("{}@{}", r.summary(), self.endpoint.node)),
        }
    }
}

/// RDMA is opened when asked for (`--kv-transport rdma`, `--require-rdma`: failing to is
/// fatal) or tried under `auto` in a build with the verbs (failing to is not).
async fn open_rdma(args: &ServeArgs, engine: &Engine) -> anyhow::Result<Option<RdmaKv>> {
    let t = &args.transfer;
    let required = t.require_rdma || t.kv_transport == KvTransport::Rdma;
    if t.require_rdma && matches!(t.kv_transport, KvTransport::Tcp | KvTransport::CudaIpc) {
        let named = clap::ValueEnum::to_possible_value(&t.kv_transport).map(|v| v.get_name().to_owned()).unwrap_or_default();
        anyhow::bail!("--require-rdma contradicts --kv-transport {named}: use --kv-transport rdma or auto");
    }
    if !required && !(t.kv_transport == KvTransport::Auto && RDMA_COMPILED) {
        return Ok(None);
    }
    match RdmaKv::open(t, engine).await {
        Ok(rdma) => Ok(Some(rdma)),
        Err(e) if required => anyhow::bail!("--kv-transport rdma / --require-rdma: {e}"),
        Err(e) => {
            tracing::info!(reason = %e, "KV moves over CUDA IPC or TCP, not RDMA");
            Ok(None)
        }
    }
}

/// The client for prefill's `/pd/*` endpoints, which sit behind `--api-key` like the API.
fn client(api_key: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key.filter(|k| !k.is_empty()) {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).context("the API key is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::Client::builder().timeout(FREE_TIMEOUT).default_headers(headers).build().context("building the HTTP client")
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{client, url_host};

    /// The headers of the one request `client` sends to a listener of ours.
    async fn headers_sent_by(client: reqwest::Client) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/pd/free", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = vec![0; 4096];
            let n = socket.read(&mut head).await.unwrap();
            socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await.unwrap();
            String::from_utf8_lossy(&head[..n]).to_lowercase()
        });
        client.post(url).body("{}").send().await.unwrap();
        server.await.unwrap()
    }

    #[tokio::test]
    async fn calls_to_another_engine_carry_this_engines_api_key() {
        assert!(headers_sent_by(client(Some("sk-1")).unwrap()).await.contains("authorization: bearer sk-1\r\n"));
        assert!(!headers_sent_by(client(None).unwrap()).await.contains("authorization"));
    }

    #[test]
    fn the_host_of_an_advertised_url() {
        assert_eq!(url_host("http://10.0.0.5:8000"), "10.0.0.5");
        assert_eq!(url_host("http://[::1]:80/x"), "[::1]");
        assert_eq!(url_host("http://svc"), "svc");
    }
}
