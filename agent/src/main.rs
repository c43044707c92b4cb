//! `dlengine`: serve a model, route between engines, generate offline, benchmark.

mod bench;
mod engine_loader;
mod generate;
mod logging;
mod openai;
mod serve;

use clap::Parser;
use dlengine_cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; anything else exits 2 with clap's reason.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return std::process::ExitCode::from(code);
        }
    };
    logging::init();
    let result = match cli.command {
        Command::Serve(args) => runtime().and_then(|rt| rt.block_on(serve::run(args))),
        Command::Router(args) => runtime().and_then(|rt| rt.block_on(dlengine_router::run(args))),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("dlengine-io").build()?)
}
