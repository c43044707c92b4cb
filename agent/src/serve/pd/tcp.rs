//! The TCP KV transport: works between any two machines, CPU or GPU (GPU KV is staged
//! through host memory). A decode engine opens a few connections to the prefill engine's
//! listener, each naming a lease and a range of layers, and receives that range a frame
//! of layers at a time. Prefill reads the next frame while the previous one is on the
//! wire: on a GPU off the engine thread, and for an early lease layer by layer as its
//! forward writes them ([`Engine::read_lease`]); decode writes each frame into the
//! request's blocks as it arrives ([`StreamedKv`]; on a GPU straight out of the pinned
//! memory it was received into, off the engine thread), so the write overlaps the
//! transfer. Several connections keep more than one socket's worth of bytes in flight.
//!
//! Wire format. Request: one line of JSON
//! `{"lease_id": "...", "layers": [start, end], "layers_per_frame": N}`. Answer: frames of
//! `status: u8` (0 data, 1 error, 2 token), `first_layer: u32` LE, `num_layers: u32` LE,
//! `len: u64` LE, then `len` bytes: the KV of those layers (in [`KvFrame`] order), in
//! layer order; prefill's first token as JSON, once, wherever it falls among them (as
//! soon as it is sampled); or a UTF-8 error message that ends the answer.
//!
//! The token travels with the KV because the lease ends once every layer has been read
//! (`read_lease`): a separate `POST /pd/first_token` could come too late to find it.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dlengine_engine::backend::KvCacheLayout;
use dlengine_engine::engine::{Engine, FirstTokenSink};
use dlengine_engine::kv_transfer::{frame_buffer, pooled_frame, FirstTokenResult, HostFrame, KvFrame, StreamedKv};
use dlengine_engine::request::TokenLogprob;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::error::Elapsed;

use super::first_token::FIRST_TOKEN_TIMEOUT;
use super::PULL_TIMEOUT;

const FRAME_DATA: u8 = 0;
const FRAME_ERROR: u8 = 1;
const FRAME_TOKEN: u8 = 2;
/// Longest request line accepted.
const MAX_REQUEST_LINE: usize = 4096;
/// Longest error message a reader accepts.
const MAX_ERROR_BYTES: u64 = 64 << 10;
/// Layers per frame: where an engine thread writes or reads frames (CPU; a GPU decode's
/// frames that came before the import had its blocks), one per step, a frame bounds how
/// long other requests wait for it (a layer of a 16K-token prompt of Qwen3-0.6B: 67 MB);
/// an early lease's frame is sent once its last layer is written.
const LAYERS_PER_FRAME: usize = 1;

#[derive(Debug, Serialize, Deserialize)]
struct PullRequest {
    lease_id: String,
    layers: [usize; 2],
    layers_per_frame: usize,
}

/// Serves lease reads on `listener` until the process exits.
pub async fn serve(listener: TcpListener, engine: Engine) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "KV transfer listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            // Bounded even if decode stops reading without closing: the wait for the
            // first token, then as long as decode itself waits for the KV.
            let served = tokio::time::timeout(FIRST_TOKEN_TIMEOUT + PULL_TIMEOUT, serve_one(socket, &engine)).await;
            if let Err(e) = served.unwrap_or_else(|_| Err(anyhow::anyhow!("decode took longer than {:?} to take the KV", FIRST_TOKEN_TIMEOUT + PULL_TIMEOUT))) {
                tracing::warn!(%peer, error = %format!("{e:#}"), "KV transfer to a decode engine failed");
            }
        });
    }
}

async fn serve_one(socket: TcpStream, engine: &Engine) -> anyhow::Result<()> {
    socket.set_nodelay(true)?;
    let mut reader = BufReader::new(socket);
    let mut line = String::new();
    let mut limited = (&mut reader).take(MAX_REQUEST_LINE as u64);
    tokio::time::timeout(Duration::from_secs(10), limited.read_line(&mut line)).await.context("waiting for the pull request")??;
    let mut socket = reader.into_inner();
    let (lease_id, layers, per_frame) = match parse_request(&line, engine.info().kv_layout.num_layers) {
        Ok(request) => request,
        Err(e) => return write_error(&mut socket, &e).await,
    };
    // Each frame is read while the one before is on the wire (off the engine thread
    // where the backend can; an early lease's layers as prefill's forward writes them).
    let (tx, mut reads) = tokio::sync::mpsc::channel(1);
    let reader = engine.clone();
    let frames: Vec<Range<usize>> = layers.clone().step_by(per_frame).map(|start| start..(start + per_frame).min(layers.end)).collect();
    let reads_done = tokio::spawn(async move {
        let mut reading = Duration::ZERO;
        for frame in frames {
            let at = Instant::now();
            let read = reader.read_lease(lease_id, frame.clone()).await.map(|bytes| (frame, bytes));
            reading += at.elapsed();
            let failed = read.is_err();
            if tx.send(read).await.is_err() || failed {
                break; // the sender gave up, or the lease is gone
            }
        }
        reading
    });
    // The first token goes out as soon as it is sampled: before, between or after the
    // layers. Asked for first, before a read can end the lease.
    let first_token = tokio::time::timeout(FIRST_TOKEN_TIMEOUT, engine.first_token_of_lease(lease_id));
    tokio::pin!(first_token);
    let (started, mut sent, mut sending, mut token_sent) = (Instant::now(), 0usize, Duration::ZERO, false);
    loop {
        tokio::select! {
            biased;
            token = &mut first_token, if !token_sent => {
                token_sent = true;
                if !send_first_token(&mut socket, lease_id, token).await? {
                    return Ok(());
                }
            }
            read = reads.recv() => match read {
                Some(Ok((frame, bytes))) => {
                    let at = Instant::now();
                    write_frame(&mut socket, FRAME_DATA, &frame, bytes.bytes()).await?;
                    sending += at.elapsed();
                    sent += bytes.bytes().len();
                }
                Some(Err(e)) => return write_error(&mut socket, &e.to_string()).await,
                None if token_sent => break,
                // Every layer sent, the token still to come.
                None => {
                    if !send_first_token(&mut socket, lease_id, (&mut first_token).await).await? {
                        return Ok(());
                    }
                    break;
                }
            }
        }
    }
    socket.shutdown().await?;
    let seconds = started.elapsed().as_secs_f64();
    // Reads (an early lease's include waiting for its forward) overlap the sends.
    let (sending_ms, reading_ms) = (sending.as_secs_f64() * 1e3, reads_done.await.unwrap_or_default().as_secs_f64() * 1e3);
    let gb_per_s = sent as f64 / seconds / 1e9;
    tracing::info!(lease_id, ?layers, bytes = sent, ms = seconds * 1e3, reading_ms, sending_ms, gb_per_s, "served a KV pull");
    Ok(())
}

/// Sends prefill's first token, or the error that ends the answer (false) if none came.
async fn send_first_token(socket: &mut TcpStream, lease_id: u64, token: Result<FirstTokenResult, Elapsed>) -> anyhow::Result<bool> {
    match token.unwrap_or_else(|_| Err("prefill's first token took too long".into())) {
        Ok(token) => write_frame(socket, FRAME_TOKEN, &(0..0), &serde_json::to_vec(&token)?).await?,
        Err(why) => {
            write_error(socket, &format!("KV lease {lease_id}: {why}")).await?;
            return Ok(false);
        }
    }
    Ok(true)
}

/// The lease id, layer range and frame size a request asks for, checked.
fn parse_request(line: &str, num_layers: usize) -> Result<(u64, Range<usize>, usize), String> {
    let request: PullRequest = serde_json::from_str(line).map_err(|e| format!("malformed pull request: {e}"))?;
    let lease_id = request.lease_id.parse::<u64>().map_err(|_| format!("malformed lease id {:?}", request.lease_id))?;
    let [start, end] = request.layers;
    if start >= end || end > num_layers {
        return Err(format!("layers {start}..{end} out of range (the model has {num_layers})"));
    }
    Ok((lease_id, start..end, request.layers_per_frame.max(1)))
}

async fn write_frame(socket: &mut TcpStream, status: u8, layers: &Range<usize>, payload: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 17];
    header[0] = status;
    header[1..5].copy_from_slice(&(layers.start as u32).to_le_bytes());
    header[5..9].copy_from_slice(&(layers.len() as u32).to_le_bytes());
    header[9..17].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    socket.write_all(&header).await?;
    socket.write_all(payload).await
}

async fn write_error(socket: &mut TcpStream, message: &str) -> anyhow::Result<()> {
    write_frame(socket, FRAME_ERROR, &(0..0), message.as_bytes()).await?;
    Ok(())
}

/// Where a pull comes from and what it must bring.
#[derive(Debug, Clone)]
pub struct PullPlan {
    addr: String,
    lease_id: String,
    num_layers: usize,
    /// Bytes of one layer of the whole lease (K and V of every block).
    layer_bytes: usize,
    connections: usize,
}

impl PullPlan {
    /// A pull of a lease of `num_blocks` blocks of `layout` from prefill's listener at `addr`.
    pub fn new(addr: &str, lease_id: &str, layout: &KvCacheLayout, num_blocks: usize, connections: usize) -> Self {
        let layer_bytes = num_blocks * layout.bytes_per_block() / layout.num_layers;
        Self { addr: addr.to_owned(), lease_id: lease_id.to_owned(), num_layers: layout.num_layers, layer_bytes, connections }
    }
}

/// Pulls every layer of a lease into `stream`, over `plan.connections` connections each
/// carrying a contiguous range of layers, and hands prefill's first token to `first_token`
/// if the request still waits for it. Any error prefill reports, a short read, a frame of
/// the wrong layers or size, or `timeout` fails the stream (and with it the request).
/// Stops early, without error, once the engine no longer wants the frames.
pub async fn pull(plan: PullPlan, stream: Arc<StreamedKv>, first_token: Option<FirstTokenSink>, timeout: Duration) {
    let started = Instant::now();
    // A task per connection, so that their receives run on several threads (joined in one
    // task, four connections moved no more than one). Dropping the set aborts the rest.
    let mut connections = tokio::task::JoinSet::new();
    let mut first_token = first_token; // taken by the first connection
    for layers in split_layers(plan.num_layers, plan.connections) {
        let (plan, stream, sink) = (plan.clone(), stream.clone(), first_token.take());
        connections.spawn(async move { pull_range(&plan, layers, &stream, sink).await });
    }
    let all = async {
        let mut whole = true;
        while let Some(done) = connections.join_next().await {
            whole &= done.context("a KV pull connection panicked")??;
        }
        anyhow::Ok(whole)
    };
    let pulled = tokio::time::timeout(timeout, all).await;
    match pulled.unwrap_or_else(|_| Err(anyhow::anyhow!("pulling KV from {} took longer than {timeout:?}", plan.addr))) {
        Ok(false) => {} // the import ended first
        Ok(true) => {
            let (bytes, seconds) = (plan.num_layers * plan.layer_bytes, started.elapsed().as_secs_f64());
            tracing::info!(addr = %plan.addr, bytes, connections = plan.connections, ms = seconds * 1e3, gb_per_s = bytes as f64 / seconds / 1e9, "pulled KV over TCP");
        }
        Err(e) => stream.fail(format!("{e:#}")),
    }
}

/// `num_layers` split into at most `parts` contiguous, non-empty ranges of near-equal size.
fn split_layers(num_layers: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, num_layers.max(1));
    (0..parts).map(|i| num_layers * i / parts..num_layers * (i + 1) / parts).filter(|r| !r.is_empty()).collect()
}

/// One connection's pull of `layers` and of the first token, which goes to `first_token`
/// (or, if the connection fails first, why it will not come).
async fn pull_range(plan: &PullPlan, layers: Range<usize>, stream: &Arc<StreamedKv>, mut first_token: Option<FirstTokenSink>) -> anyhow::Result<bool> {
    let pulled = pull_range_into(plan, layers, stream, &mut first_token).await;
    if let (Err(e), Some(sink)) = (&pulled, first_token) {
        sink.provide(Err(format!("{e:#}")));
    }
    pulled
}

/// True once every frame was received; false if the import ended first.
async fn pull_range_into(plan: &PullPlan, layers: Range<usize>, stream: &Arc<StreamedKv>, first_token: &mut Option<FirstTokenSink>) -> anyhow::Result<bool> {
    let mut socket = TcpStream::connect(&plan.addr).await.with_context(|| format!("connecting to prefill's KV listener {}", plan.addr))?;
    socket.set_nodelay(true)?;
    let request = PullRequest { lease_id: plan.lease_id.clone(), layers: [layers.start, layers.end], layers_per_frame: LAYERS_PER_FRAME };
    let mut line = serde_json::to_vec(&request)?;
    line.push(b'\n');
    socket.write_all(&line).await?;
    let mut socket = BufReader::with_capacity(1 << 20, socket);
    let (mut next, mut token_seen) = (layers.start, false);
    while next < layers.end || !token_seen {
        let (status, first, count, len) = read_header(&mut socket).await?;
        match status {
            FRAME_TOKEN if !token_seen => {
                let json = read_bytes(&mut socket, len.min(MAX_ERROR_BYTES) as usize, Vec::new()).await?;
                let token: TokenLogprob = serde_json::from_slice(&json).context("prefill sent a malformed first token")?;
                token_seen = true;
                if let Some(sink) = first_token.take() {
                    sink.provide(Ok(token));
                }
            }
            FRAME_DATA => {
                let frame = first..first + count;
                if first != next || frame.end > layers.end || count == 0 || len != (count * plan.layer_bytes) as u64 {
                    bail!("prefill sent a frame of layers {frame:?} and {len} bytes; expected layers from {next} to {} of {} bytes each", layers.end, plan.layer_bytes);
                }
                let bytes = receive_frame(&mut socket, len as usize, stream).await?;
                if !stream.deliver(KvFrame { layers: frame.clone(), bytes }).await {
                    return Ok(false); // the import ended: nothing more is wanted
                }
                next = frame.end;
            }
            _ => return Err(refusal(&mut socket, status, len).await),
        }
    }
    Ok(true)
}

/// What prefill said instead of the frame expected.
async fn refusal(socket: &mut BufReader<TcpStream>, status: u8, len: u64) -> anyhow::Error {
    if status != FRAME_ERROR {
        return anyhow::anyhow!("prefill sent a frame of unexpected kind {status}");
    }
    match read_bytes(socket, len.min(MAX_ERROR_BYTES) as usize, Vec::new()).await {
        Ok(message) => anyhow::anyhow!("prefill refused the pull: {}", String::from_utf8_lossy(&message)),
        Err(e) => e,
    }
}

async fn read_header(socket: &mut BufReader<TcpStream>) -> anyhow::Result<(u8, usize, usize, u64)> {
    let mut header = [0u8; 17];
    socket.read_exact(&mut header).await.context("reading a KV frame header")?;
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes")) as usize;
    Ok((header[0], word(1), word(5), u64::from_le_bytes(header[9..17].try_into().expect("8 bytes"))))
}

/// Receives a frame of `len` bytes into memory the import's writer reads without a copy
/// (on a GPU: pinned memory the device maps) where it has one, else into a pooled buffer.
async fn receive_frame(socket: &mut BufReader<TcpStream>, len: usize, stream: &StreamedKv) -> anyhow::Result<HostFrame> {
    let Some(buffer) = stream.receive_buffer(len) else {
        return Ok(pooled_frame(read_bytes(socket, len, frame_buffer(len)).await?));
    };
    let mut frame = buffer.map_err(|e| anyhow::anyhow!("a buffer for a KV frame: {e}"))?;
    socket.read_exact(frame.bytes_mut()).await.context("reading KV bytes")?;
    Ok(frame)
}

/// Reads exactly `len` bytes, appended to `into` (empty, with room reserved: no zero-filling
/// of what is about to be overwritten).
async fn read_bytes(socket: &mut BufReader<TcpStream>, len: usize, mut into: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    // A pooled buffer has its pages mapped already; room was reserved for `len` bytes.
    let read = socket.take(len as u64).read_to_end(&mut into).await.context("reading KV bytes")?;
    if read != len {
        bail!("the connection closed {read} bytes into a frame of {len}");
    }
    Ok(into)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dlengine_engine::backend::cpu::CpuBackend;
    use dlengine_engine::config::EngineConfig;
    use dlengine_engine::engine::{Engine, RequestStream};
    use dlengine_engine::kv_transfer::{ImportedKv, KvSource, KvTransfer};
    use dlengine_engine::request::{GenerateRequest, TokenLogprob};
    use dlengine_engine::sampling_params::SamplingParams;

    use super::{parse_request, pull, serve, split_layers, PullPlan};

    fn engine() -> Engine {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3-tiny");
        let config = EngineConfig { block_size: 4, ..EngineConfig::default() };
        Engine::start(&dir, config, CpuBackend::new(64 << 20)).unwrap()
    }

    fn request(prompt: &[u32], kv_transfer: KvTransfer) -> GenerateRequest {
        let params = SamplingParams { temperature: 0.0, max_tokens: 8, ignore_eos: true, ..SamplingParams::default() };
        GenerateRequest { request_id: "r".into(), prompt_token_ids: prompt.to_vec(), params, kv_transfer }
    }

    /// Every token of a request, or the engine's error.
    async fn tokens(engine: &Engine, request: GenerateRequest) -> Result<Vec<u32>, String> {
        collect(engine.submit(request).map_err(|e| format!("{e:?}"))?).await
    }

    async fn collect(mut stream: RequestStream) -> Result<Vec<u32>, String> {
        let mut out = Vec::new();
        while let Some(delta) = stream.next().await {
            out.extend(delta.map_err(|e| e.to_string())?.token_ids);
        }
        Ok(out)
    }

    /// Decode's import of `lease_id` over TCP from `addr` (a frame per layer, over
    /// `connections`), with prefill's first token if known; its tokens, or why it failed.
    async fn import(decode: &Engine, addr: &str, prompt: &[u32], lease: (&str, usize, Option<u32>), connections: usize) -> Result<Vec<u32>, String> {
        let (lease_id, blocks, first) = lease;
        let frames = decode.streamed_kv(blocks, "tcp");
        let plan = PullPlan::new(addr, lease_id, &decode.info().kv_layout, blocks, connections);
        // Over two connections the token is left to the pull, as for an early descriptor.
        let token_from_pull = connections == 2 || first.is_none();
        let first_token = first.filter(|_| !token_from_pull).map(|token_id| TokenLogprob { token_id, logprob: 0.0, top: Vec::new() });
        let source = KvSource::Streamed(frames.clone());
        let imported = request(prompt, KvTransfer::Import(ImportedKv { first_token, source }));
        let stream = decode.submit(imported).map_err(|e| format!("{e:?}"))?;
        let sink = token_from_pull.then(|| stream.first_token_sink());
        tokio::spawn(pull(plan, frames, sink, Duration::from_secs(10)));
        collect(stream).await
    }

    /// A lease of `prompt` on prefill: late (handed off after the first token), or early
    /// (announced before the forward, pulled at once, the token coming with the pull).
    async fn lease(prefill: &Engine, prompt: &[u32], early: bool) -> (String, usize, Option<u32>, RequestStream) {
        let kv_transfer = if early { KvTransfer::ExportEarly } else { KvTransfer::Export };
        let mut exported = prefill.submit(request(prompt, kv_transfer)).unwrap();
        let delta = exported.next().await.unwrap().unwrap();
        if early {
            let kv = delta.kv_ready.expect("announced before the first token");
            return (kv.lease_id.to_string(), kv.blocks.len(), None, exported);
        }
        let handoff = delta.kv_handoff.expect("handed off after the first token");
        (handoff.lease_id.to_string(), handoff.blocks.len(), Some(delta.token_ids[0]), exported)
    }

    #[tokio::test]
    async fn a_pull_over_several_connections_continues_exactly_and_an_unknown_lease_fails_the_import() {
        let (prefill, decode) = (engine(), engine());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(serve(listener, prefill.clone()));
        let prompt: Vec<u32> = (0..23).map(|i| i * 31 % 700 + 3).collect();
        let expected = tokens(&decode, request(&prompt, KvTransfer::Local)).await.unwrap();
        assert_eq!(decode.info().kv_layout.num_layers, 2);
        // One connection bringing two frames, and two bringing one each (and the token);
        // an early lease, pulled as soon as it is announced.
        for (connections, early) in [(1, false), (2, false), (2, true)] {
            let (id, blocks, first, _exported) = lease(&prefill, &prompt, early).await;
            let got = import(&decode, &addr, &prompt, (&id, blocks, first), connections).await;
            assert_eq!(got.as_ref(), Ok(&expected), "over {connections} connection(s), early: {early}");
            assert!(!prefill.free_lease(id.parse().unwrap()).await, "read whole, the lease already ended on prefill");
        }
        let (id, blocks, first, _exported) = lease(&prefill, &prompt, false).await;
        assert!(prefill.free_lease(id.parse().unwrap()).await);
        let failed = import(&decode, &addr, &prompt, (&id, blocks, first), 2).await;
        assert!(failed.as_ref().is_err_and(|e| e.contains("unknown or expired KV lease")), "{failed:?}");
        assert_eq!((prefill.stats().kv_blocks_used, decode.stats().kv_blocks_used), (0, 0));
        prefill.shutdown();
        decode.shutdown();
    }

    #[test]
    fn layers_split_into_contiguous_ranges_covering_each_layer_once() {
        assert_eq!(split_layers(28, 4), vec![0..7, 7..14, 14..21, 21..28]);
        assert_eq!(split_layers(5, 2), vec![0..2, 2..5]);
        assert_eq!(split_layers(2, 8), vec![0..1, 1..2], "never more connections than layers");
        assert_eq!(split_layers(3, 0), vec![0..3]);
    }

    #[test]
    fn a_pull_request_outside_the_model_is_refused_naming_the_range() {
        assert_eq!(parse_request(r#"{"lease_id":"7","layers":[2,4],"layers_per_frame":0}"#, 4), Ok((7, 2..4, 1)));
        assert!(parse_request(r#"{"lease_id":"7","layers":[2,5],"layers_per_frame":1}"#, 4).unwrap_err().contains("layers 2..5 out of range"));
        assert!(parse_request(r#"{"lease_id":"7","layers":[3,3],"layers_per_frame":1}"#, 4).is_err());
        assert!(parse_request(r#"{"lease_id":"x","layers":[0,1],"layers_per_frame":1}"#, 4).unwrap_err().contains("malformed lease id"));
    }
}
