//! The TCP KV transport: works between any two machines, CPU or GPU (GPU KV is staged
//! through host memory). A decode engine connects to the prefill engine's listener,
//! names a lease, and receives the lease's blocks a few layers at a time; reading the
//! next layers (on prefill's engine thread, between steps) overlaps sending these.
//!
//! Wire format. Request: one line of JSON `{"lease_id": "...", "layers_per_chunk": N}`.
//! Answer: frames in layer order, each `status: u8` (0 data, 1 error), `len: u64` LE,
//! then `len` bytes (KV bytes, or a UTF-8 error message that ends the answer).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dlengine_engine::engine::Engine;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const FRAME_DATA: u8 = 0;
const FRAME_ERROR: u8 = 1;
/// Longest request line accepted.
const MAX_REQUEST_LINE: usize = 4096;
/// Longest error message a reader accepts.
const MAX_ERROR_BYTES: u64 = 64 << 10;
/// Layers read per engine command: small enough that steps interleave, large enough
/// that per-command overhead does not matter.
pub const DEFAULT_LAYERS_PER_CHUNK: usize = 4;

#[derive(Debug, Serialize, Deserialize)]
struct PullRequest {
    lease_id: String,
    layers_per_chunk: usize,
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
            if let Err(e) = serve_one(socket, &engine).await {
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
    let request: PullRequest = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return write_error(&mut socket, &format!("malformed pull request: {e}")).await,
    };
    let Ok(lease_id) = request.lease_id.parse::<u64>() else {
        return write_error(&mut socket, &format!("malformed lease id {:?}", request.lease_id)).await;
    };
    let layers = engine.info().kv_layout.num_layers;
    let chunk = request.layers_per_chunk.clamp(1, layers.max(1));
    // The engine thread reads the next layers while this task sends the previous ones.
    let (tx, mut reads) = tokio::sync::mpsc::channel(1);
    let reader = engine.clone();
    tokio::spawn(async move {
        for start in (0..layers).step_by(chunk) {
            let read = reader.read_lease(lease_id, start..(start + chunk).min(layers)).await;
            let failed = read.is_err();
            if tx.send(read).await.is_err() || failed {
                break; // the sender gave up, or the lease is gone
            }
        }
    });
    let (started, mut sent) = (Instant::now(), 0usize);
    while let Some(read) = reads.recv().await {
        match read {
            Ok(bytes) => {
                write_frame(&mut socket, FRAME_DATA, &bytes).await?;
                sent += bytes.len();
            }
            Err(e) => return write_error(&mut socket, &e.to_string()).await,
        }
    }
    socket.shutdown().await?;
    // The pull is complete, so the lease has done its work: free it here rather than wait
    // for decode's POST /pd/free, which a decode dying right after its first token may
    // never send. (Had decode lost the bytes after all, its request fails and the router
    // prefills it again; the lease is not needed for that.)
    engine.free_lease(lease_id).await;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(lease_id, bytes = sent, ms = seconds * 1e3, gb_per_s = sent as f64 / seconds / 1e9, "served a KV pull");
    Ok(())
}

async fn write_frame(socket: &mut TcpStream, status: u8, payload: &[u8]) -> std::io::Result<()> {
    socket.write_all(&[status]).await?;
    socket.write_all(&(payload.len() as u64).to_le_bytes()).await?;
    socket.write_all(payload).await
}

async fn write_error(socket: &mut TcpStream, message: &str) -> anyhow::Result<()> {
    write_frame(socket, FRAME_ERROR, message.as_bytes()).await?;
    Ok(())
}

/// Pulls every layer of a lease from `addr`; fails on any error the other side reports,
/// a short read, a byte count other than `expected_bytes`, or `timeout`.
pub async fn pull(addr: &str, lease_id: &str, expected_bytes: usize, timeout: Duration) -> anyhow::Result<Vec<u8>> {
    let started = Instant::now();
    let bytes = tokio::time::timeout(timeout, pull_inner(addr, lease_id, expected_bytes))
        .await
        .with_context(|| format!("pulling KV from {addr} took longer than {timeout:?}"))??;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(%addr, bytes = bytes.len(), ms = seconds * 1e3, gb_per_s = bytes.len() as f64 / seconds / 1e9, "pulled KV over TCP");
    Ok(bytes)
}

async fn pull_inner(addr: &str, lease_id: &str, expected_bytes: usize) -> anyhow::Result<Vec<u8>> {
    let mut socket = TcpStream::connect(addr).await.with_context(|| format!("connecting to prefill's KV listener {addr}"))?;
    socket.set_nodelay(true)?;
    let request = PullRequest { lease_id: lease_id.to_owned(), layers_per_chunk: DEFAULT_LAYERS_PER_CHUNK };
    let mut line = serde_json::to_vec(&request)?;
    line.push(b'\n');
    socket.write_all(&line).await?;
    let mut socket = tokio::io::BufReader::with_capacity(1 << 20, socket);
    let mut out = Vec::with_capacity(expected_bytes);
    loop {
        let mut status = [0u8; 1];
        match socket.read_exact(&mut status).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e).context("reading a KV frame"),
        }
        let len = socket.read_u64_le().await.context("reading a KV frame length")?;
        let room = if status[0] == FRAME_DATA { (expected_bytes - out.len()) as u64 } else { MAX_ERROR_BYTES };
        if len > room {
            bail!("prefill sent a frame of {len} bytes where at most {room} fit (the descriptor announced {expected_bytes})");
        }
        let start = out.len();
        // Appends into spare capacity: no zero-filling of what is about to be overwritten.
        let read = (&mut socket).take(len).read_to_end(&mut out).await.context("reading KV bytes")?;
        if read as u64 != len {
            bail!("the connection closed {} bytes into a frame of {len}", read);
        }
        if status[0] == FRAME_ERROR {
            bail!("prefill refused the pull: {}", String::from_utf8_lossy(&out[start..]));
        }
    }
    if out.len() != expected_bytes {
        bail!("prefill sent {} bytes of KV, expected {expected_bytes}", out.len());
    }
    Ok(out)
}
