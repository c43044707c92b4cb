//! `dlengine bench`: each mode prints a table and, with `--json`, writes its results.

mod latency;
mod overhead;
mod roofline;
mod serving;
mod throughput;
mod workload;

use dlengine_cli::{BenchArgs, BenchMode};

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut report = match args.mode {
        BenchMode::Latency => latency::run(&args)?,
        BenchMode::Throughput => throughput::run(&args)?,
        BenchMode::Serving => serving::run(&args)?,
        BenchMode::Overhead => overhead::run(&args)?,
    };
    report["date"] = serde_json::json!(chrono::Utc::now().to_rfc3339());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
