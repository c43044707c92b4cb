//! `dlengine generate`: offline batch generation without HTTP. Prompts come from
//! `--prompt` or a JSONL file (one object per line: `prompt` plus optional `id`,
//! `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `ignore_eos`); results go to
//! `--output` or stdout as JSONL, in input order.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::{bail, Context};
use dlengine_cli::GenerateArgs;
use dlengine_engine::engine::{Engine, RequestStream};
use dlengine_engine::request::GenerateRequest;
use dlengine_engine::sampling_params::SamplingParams;
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    #[serde(default)]
    id: Option<String>,
    prompt: String,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    seed: Option<u64>,
    ignore_eos: Option<bool>,
}

fn read_inputs(args: &GenerateArgs) -> anyhow::Result<Vec<InputLine>> {
    if let Some(prompt) = &args.prompt {
        let line = InputLine {
            id: None,
            prompt: prompt.clone(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            ignore_eos: None,
        };
        return Ok(vec![line]);
    }
    let path = args.input.as_ref().context("either --prompt or --input is required")?;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut lines = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: reading line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str(&line).with_context(|| format!("{}: line {}", path.display(), n + 1))?;
        lines.push(parsed);
    }
    if lines.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(lines)
}

fn params(args: &GenerateArgs, line: &InputLine) -> SamplingParams {
    SamplingParams {
        max_tokens: line.max_tokens.unwrap_or(args.max_tokens),
        temperature: line.temperature.unwrap_or(args.temperature),
        top_p: line.top_p.unwrap_or(args.top_p),
        top_k: line.top_k.unwrap_or(args.top_k),
        seed: line.seed,
        ignore_eos: line.ignore_eos.unwrap_or(args.ignore_eos),
        ..SamplingParams::default()
    }
}

fn submit(engine: &Engine, args: &GenerateArgs, lines: &[InputLine]) -> anyhow::Result<Vec<RequestStream>> {
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let prompt_token_ids =
                engine.tokenizer().encode(&line.prompt, true).map_err(|e| anyhow::anyhow!("prompt {i}: {e}"))?;
            let request =
                GenerateRequest { request_id: line.id.clone().unwrap_or_else(|| i.to_string()), prompt_token_ids, params: params(args, line), kv_transfer: Default::default() };
            engine.submit(request).map_err(|e| anyhow::anyhow!("prompt {i}: {e}"))
        })
        .collect()
}

/// Drains one request's stream into a JSON result line.
fn collect(id: String, prompt: &str, mut stream: RequestStream) -> anyhow::Result<serde_json::Value> {
    let (mut text, mut tokens, mut finish) = (String::new(), Vec::new(), None);
    while let Some(delta) = stream.next_blocking() {
        let delta = delta.with_context(|| format!("request {id}"))?;
        text.push_str(&delta.text);
        tokens.extend(delta.token_ids);
        finish = delta.finish_reason.or(finish);
    }
    let usage = stream.usage();
    Ok(json!({
        "id": id, "prompt": prompt, "text": text, "token_ids": tokens,
        "finish_reason": finish.map(|f| f.as_str()),
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "cached_tokens": usage.cached_tokens},
    }))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let lines = read_inputs(&args)?;
    let engine = crate::engine_loader::load(&args.model, &args.engine, lines.len().max(1))?;
    let started = Instant::now();
    let streams = submit(&engine, &args, &lines)?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut generated = 0usize;
    for ((i, line), stream) in lines.iter().enumerate().zip(streams) {
        let result = collect(line.id.clone().unwrap_or_else(|| i.to_string()), &line.prompt, stream)?;
        generated += result["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize;
        writeln!(out, "{result}")?;
    }
    out.flush()?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(prompts = lines.len(), generated, seconds = secs, tokens_per_second = generated as f64 / secs, "done");
    engine.shutdown();
    Ok(())
}
