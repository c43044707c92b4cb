//! Host overhead per engine step with the device taken out (see
//! `dlengine_engine::host_overhead`).

use dlengine_cli::BenchArgs;
use dlengine_engine::host_overhead;

pub fn run(args: &BenchArgs) -> anyhow::Result<serde_json::Value> {
    let prompt_len = args.prompt_lens.first().copied().unwrap_or(128);
    let steps = args.output_len.max(32);
    let r = host_overhead::measure(args.num_seqs, prompt_len, steps);
    println!("host overhead per decode step (scheduler + step inputs + sampling bookkeeping + events)");
    println!("{:>8} {:>10} {:>8} {:>10} {:>10} {:>10} {:>12}", "seqs", "prompt", "steps", "mean µs", "p50 µs", "p99 µs", "tokens/step");
    println!(
        "{:>8} {:>10} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>12.1}",
        r.num_seqs, r.prompt_len, r.steps, r.mean_us, r.p50_us, r.p99_us, r.tokens_per_step
    );
    Ok(serde_json::to_value(r)?)
}
