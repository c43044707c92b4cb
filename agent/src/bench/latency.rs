//! Batch-1 decode speed and time to first token at several prompt lengths, on an idle
//! engine, against the roofline.

use anyhow::Context;
use dlengine_cli::BenchArgs;
use dlengine_engine::config::ModelConfig;
use serde_json::json;

use super::roofline;
use super::workload::{median, random_prompt, timed};

const DECODE_PROMPT: usize = 128;
const REPEATS: usize = 5;

pub fn run(args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let model = args.model.as_ref().context("--model MODEL_DIR is required")?;
    let config = ModelConfig::from_dir(model)?;
    let engine = crate::engine_loader::load(model, &args.engine, 4096)?;
    let info = engine.info().clone();
    let roof = roofline::measure(&config, &info.device);
    // Warm-up: first-use costs (kernel loads, allocator growth) stay out of the figures.
    timed(&engine, 0, random_prompt(DECODE_PROMPT, info.vocab_size, 0), 8)?;

    let runs = (0..REPEATS)
        .map(|r| timed(&engine, r + 1, random_prompt(DECODE_PROMPT, info.vocab_size, 100 + r as u64), args.output_len))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let decode = median(runs.iter().map(|t| t.decode_tokens_per_second()).collect());
    let end_to_end = median(runs.iter().map(|t| t.tokens as f64 / t.total.as_secs_f64()).collect());
    let mut ttft = serde_json::Map::new();
    for &len in &args.prompt_lens {
        if len + 1 > info.max_model_len {
            continue;
        }
        let ms = (0..REPEATS)
            .map(|r| Ok(timed(&engine, 1000 + r, random_prompt(len, info.vocab_size, 7000 + (len * 31 + r) as u64), 1)?.ttft.as_secs_f64() * 1e3))
            .collect::<anyhow::Result<Vec<f64>>>()?;
        ttft.insert(len.to_string(), json!(median(ms)));
    }
    let stats = engine.stats();
    engine.shutdown();

    println!("latency on {} ({})", model.display(), info.device);
    if let Some(r) = &roof {
        println!(
            "copy bandwidth {:.0} GB/s, weights read per token {:.2} GB, batch-1 roofline {:.0} tok/s",
            r.copy_bandwidth_gbps,
            r.weight_bytes_per_token as f64 / 1e9,
            r.tokens_per_second
        );
    }
    let fraction = roof.as_ref().map(|r| decode / r.tokens_per_second);
    println!("{:<34} {:>12}", "metric", "value");
    println!("{:<34} {:>12.1}", "decode tok/s (batch 1)", decode);
    println!("{:<34} {:>12.3}", "decode ms/token", 1e3 / decode);
    if let Some(f) = fraction {
        println!("{:<34} {:>11.1}%", "of roofline", f * 100.0);
    }
    println!("{:<34} {:>12.1}", format!("end-to-end tok/s ({DECODE_PROMPT} in, {} out)", args.output_len), end_to_end);
    for (len, ms) in &ttft {
        println!("{:<34} {:>12.1}", format!("TTFT ms, {len}-token prompt"), ms.as_f64().unwrap_or(0.0));
    }
    Ok(json!({
        "mode": "latency", "model": model.display().to_string(), "device": info.device,
        "roofline": roof, "decode_tokens_per_second": decode, "decode_ms_per_token": 1e3 / decode,
        "fraction_of_roofline": fraction, "end_to_end_tokens_per_second": end_to_end,
        "prompt_len_for_decode": DECODE_PROMPT, "output_len": args.output_len, "ttft_ms": ttft,
        "device_busy_ms": stats.device_busy_ms, "device_idle_between_steps_ms": stats.device_idle_between_steps_ms,
    }))
}
