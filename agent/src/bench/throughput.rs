//! Offline throughput: many prompts submitted at once, every output to its full length.

use std::time::Instant;

use anyhow::Context;
use dlengine_cli::BenchArgs;
use serde_json::json;

use super::workload::{greedy, random_prompt, submit};

pub fn run(args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let model = args.model.as_ref().context("--model MODEL_DIR is required")?;
    let input_len = args.prompt_lens.first().copied().unwrap_or(1024);
    let engine = crate::engine_loader::load(model, &args.engine, args.num_prompts.max(1))?;
    let info = engine.info().clone();
    let before = engine.stats();
    let started = Instant::now();
    let streams = (0..args.num_prompts)
        .map(|i| submit(&engine, i, random_prompt(input_len, info.vocab_size, 50_000 + i as u64), greedy(args.output_len)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let handles: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let mut n = 0;
                while let Some(d) = s.next_blocking() {
                    n += d.context("request failed")?.token_ids.len();
                }
                Ok(n)
            })
        })
        .collect();
    let mut generated = 0;
    for h in handles {
        generated += h.join().map_err(|_| anyhow::anyhow!("a collector thread panicked"))??;
    }
    let secs = started.elapsed().as_secs_f64();
    let stats = engine.stats();
    engine.shutdown();
    let busy = stats.device_busy_ms - before.device_busy_ms;
    let idle = stats.device_idle_between_steps_ms - before.device_idle_between_steps_ms;
    let steps = stats.steps - before.steps;
    println!("offline throughput on {} ({})", model.display(), info.device);
    println!("{:>8} {:>8} {:>8} {:>12} {:>14} {:>10} {:>14}", "prompts", "in", "out", "seconds", "output tok/s", "steps", "device idle %");
    let idle_pct = if busy + idle > 0.0 { 100.0 * idle / (busy + idle) } else { 0.0 };
    println!(
        "{:>8} {:>8} {:>8} {:>12.1} {:>14.0} {:>10} {:>13.1}%",
        args.num_prompts, input_len, args.output_len, secs, generated as f64 / secs, steps, idle_pct
    );
    Ok(json!({
        "mode": "throughput", "model": model.display().to_string(), "device": info.device,
        "num_prompts": args.num_prompts, "input_len": input_len, "output_len": args.output_len,
        "seconds": secs, "output_tokens": generated, "output_tokens_per_second": generated as f64 / secs,
        "steps": steps, "preemptions": stats.preemptions - before.preemptions,
        "device_busy_ms": busy, "device_idle_between_steps_ms": idle,
    }))
}
