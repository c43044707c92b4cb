//! `dlengine serve`: the OpenAI-compatible HTTP server in front of one engine.
//!
//! Life of the process: bind the port first (so `/health` answers 503 while the model
//! loads), load the engine on a blocking thread, serve; on SIGTERM/SIGINT stop taking new
//! work (health and new requests get 503), let in-flight requests finish within
//! `--drain-timeout-secs`, stop the HTTP server, shut the engine down, exit 0.
//!
//! Handlers do request-level work only (parsing, templating, tokenizing once); the engine
//! stream already detokenizes, so per-token work here is one chunk serialization.

mod auth;
mod chat;
mod chat_prompt;
mod chat_response;
mod chat_setup;
mod chat_template;
mod completion_response;
mod completions;
mod engine_errors;
mod finish;
mod generation;
mod in_flight;
mod info;
mod json_body;
mod logprobs;
mod metrics;
mod output_parser;
mod pd;
mod request_id;
mod routes;
mod sampling;
mod shutdown;
mod sse;
mod state;
mod stream_options;

use anyhow::Context;
use dlengine_cli::ServeArgs;

use axum::serve::ListenerExt;
use chat_setup::ChatSetup;
use state::{AppState, Ready};

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let state = AppState::new(&args);
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let app = routes::router(state.clone());
    let mut server = tokio::spawn(async move {
        // Without TCP_NODELAY a streamed token written right after the response headers
        // waits for their ACK, which a keep-alive client delays by up to 40 ms.
        let listener = listener.tap_io(|socket| {
            let _ = socket.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await
    });
    tracing::info!(model = %state.served_model(), "listening on http://{local}");

    // One signal listener for the whole life, so a signal between phases is not lost.
    let mut signal = std::pin::pin!(shutdown::signal());
    let loader = tokio::task::spawn_blocking({
        let args = args.clone();
        move || crate::engine_loader::load_engine(&args)
    });
    // Registry (etcd, issue 4): started once the engine is loaded; revoked before draining.
    let identity = dlengine_registry::Identity::from_args(
        &args.registry,
        args.mode.into(),
        &args.host,
        local.port(),
        std::env::var(dlengine_cli::env::POD_IP).ok().as_deref(),
    )?;
    let registration = tokio::select! {
        loaded = loader => {
            let engine = loaded.context("the model loader panicked")??;
            let chat = ChatSetup::from_tokenizer_config(&engine.tokenizer().config);
            let pd = pd::Pd::start(&args, &engine, state.served_model(), &identity).await?;
            let registration = register_in_etcd(&args, &identity, state.served_model(), &engine, pd.transfer_endpoints())?;
            state.set_ready(Ready { engine, chat, pd });
            if let Some(registration) = &registration {
                registration.mark_ready(); // /health is OK from here on
            }
            tracing::info!(mode = args.mode.as_str(), "ready");
            registration
        }
        _ = &mut signal => {
            tracing::info!("signal while loading; exiting");
            return Ok(());
        }
        served = &mut server => return Err(anyhow::anyhow!("the HTTP server stopped: {:?}", served)),
    };

    tokio::select! {
        _ = &mut signal => {}
        served = &mut server => return Err(anyhow::anyhow!("the HTTP server stopped: {:?}", served)),
    }
    if let Some(registration) = registration {
        registration.shutdown().await; // routers stop sending before the drain starts
    }
    shutdown::drain(&state, std::time::Duration::from_secs(args.drain_timeout_secs)).await;
    let _ = stop_http.send(());
    // The engine goes first: streams still running after the drain timeout then end with
    // an error event and [DONE], which the HTTP server gets to deliver before it stops.
    if let Some(engine) = state.loaded_engine().cloned() {
        tokio::task::spawn_blocking(move || engine.shutdown()).await.context("engine shutdown panicked")?;
    }
    shutdown::stop_server(server).await;
    tracing::info!("stopped");
    Ok(())
}

/// Registration in etcd when `--etcd-endpoints` is set (docs/registry.md); `None` without.
fn register_in_etcd(
    args: &ServeArgs,
    identity: &dlengine_registry::Identity,
    served_model_name: &str,
    engine: &dlengine_engine::engine::Engine,
    transfer: dlengine_registry::TransferEndpoints,
) -> anyhow::Result<Option<dlengine_registry::RegistrarHandle>> {
    let model = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(dlengine_registry::register_engine(&args.registry, identity, &model, served_model_name, engine, transfer)?)
}
