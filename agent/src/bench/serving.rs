//! An OpenAI-API load generator against a running server (`--url`): at each concurrency,
//! that many clients send streaming completions back to back; TTFT and TPOT percentiles
//! and output throughput per level.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dlengine_cli::BenchArgs;
use futures::StreamExt;
use serde_json::{json, Value};

use super::workload::{percentile, random_prompt};

/// Prompt ids stay below this so any model's vocabulary holds them.
const SAFE_VOCAB: usize = 990;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

struct Sample {
    ttft_ms: f64,
    tpot_ms: Option<f64>,
    tokens: usize,
}

async fn served_model(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let models: Value = client.get(format!("{url}/v1/models")).send().await?.error_for_status()?.json().await?;
    models["data"][0]["id"].as_str().map(str::to_owned).context("the server lists no model")
}

/// One streamed completion, timed at the client.
async fn one(client: &reqwest::Client, url: &str, model: &str, prompt: Vec<u32>, max_tokens: usize) -> anyhow::Result<Sample> {
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true},
    });
    let started = Instant::now();
    let response = client.post(format!("{url}/v1/completions")).json(&body).timeout(REQUEST_TIMEOUT).send().await?;
    if !response.status().is_success() {
        bail!("HTTP {}: {}", response.status(), response.text().await.unwrap_or_default());
    }
    let (mut first, mut last, mut tokens, mut buf) = (None, None, 0usize, String::new());
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).context("a malformed SSE event")?;
            if v.get("error").is_some() {
                bail!("stream error: {data}");
            }
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                let now = started.elapsed();
                first.get_or_insert(now);
                last = Some(now);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
    }
    let first = first.context("no token arrived")?;
    let last = last.unwrap_or(first);
    let tpot_ms = (tokens > 1).then(|| (last - first).as_secs_f64() * 1e3 / (tokens - 1) as f64);
    Ok(Sample { ttft_ms: first.as_secs_f64() * 1e3, tpot_ms, tokens })
}

async fn level(client: &reqwest::Client, url: &str, model: &str, concurrency: usize, requests: usize, input_len: usize, output_len: usize) -> Value {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers = (0..concurrency).map(|_| {
        let (next, client) = (next.clone(), client.clone());
        async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return out;
                }
                let prompt = random_prompt(input_len, SAFE_VOCAB, (concurrency * 100_000 + i) as u64);
                out.push(one(&client, url, model, prompt, output_len).await);
            }
        }
    });
    let results: Vec<anyhow::Result<Sample>> = futures::future::join_all(workers).await.into_iter().flatten().collect();
    let secs = started.elapsed().as_secs_f64();
    let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    let ok: Vec<&Sample> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let ttft: Vec<f64> = ok.iter().map(|s| s.ttft_ms).collect();
    let tpot: Vec<f64> = ok.iter().filter_map(|s| s.tpot_ms).collect();
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    json!({
        "concurrency": concurrency, "requests": requests, "errors": errors.len(), "first_error": errors.first(),
        "seconds": secs, "output_tokens_per_second": tokens as f64 / secs,
        "ttft_ms_p50": percentile(ttft.clone(), 0.5), "ttft_ms_p99": percentile(ttft, 0.99),
        "tpot_ms_p50": percentile(tpot.clone(), 0.5), "tpot_ms_p99": percentile(tpot, 0.99),
    })
}

pub fn run(args: &BenchArgs) -> anyhow::Result<Value> {
    let url = args.url.as_deref().context("--url http://HOST:PORT of a running server is required")?.trim_end_matches('/').to_owned();
    let input_len = args.prompt_lens.first().copied().unwrap_or(128);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let levels = runtime.block_on(async {
        let client = reqwest::Client::builder().pool_max_idle_per_host(1024).build()?;
        let model = served_model(&client, &url).await?;
        let mut levels = Vec::new();
        for &c in &args.concurrency {
            let requests = args.num_prompts.max(2 * c);
            levels.push(level(&client, &url, &model, c, requests, input_len, args.output_len).await);
        }
        anyhow::Ok(levels)
    })?;
    println!("serving against {url}: {input_len} tokens in, {} out", args.output_len);
    println!("{:>6} {:>8} {:>7} {:>12} {:>10} {:>10} {:>10} {:>10}", "conc", "requests", "errors", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99");
    for l in &levels {
        let f = |k: &str| l[k].as_f64().unwrap_or(0.0);
        println!(
            "{:>6} {:>8} {:>7} {:>12.0} {:>9.1}ms {:>9.1}ms {:>9.2}ms {:>9.2}ms",
            l["concurrency"], l["requests"], l["errors"], f("output_tokens_per_second"), f("ttft_ms_p50"), f("ttft_ms_p99"), f("tpot_ms_p50"), f("tpot_ms_p99")
        );
    }
    Ok(json!({"mode": "serving", "url": url, "input_len": input_len, "output_len": args.output_len, "levels": levels}))
}
