//! Structured logs through `tracing`; `RUST_LOG` filters, `DLENGINE_LOG_FORMAT=json` for
//! machine-readable lines.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let json = std::env::var("DLENGINE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
