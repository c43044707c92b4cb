//! Graceful shutdown: the signals, the drain, the HTTP server's end.

use std::time::Duration;

use tokio::task::JoinHandle;

use super::state::AppState;

/// Time the HTTP server gets to close its connections once requests are done.
const CLOSE_CONNECTIONS: Duration = Duration::from_secs(2);

/// SIGTERM (Kubernetes) or SIGINT (Ctrl-C).
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: draining"),
        _ = term => tracing::info!("SIGTERM: draining"),
    }
}

/// Refuses new work, then waits for in-flight requests (streams included) up to `timeout`.
pub async fn drain(state: &AppState, timeout: Duration) {
    state.begin_drain();
    let in_flight = state.in_flight().count();
    tracing::info!(in_flight, timeout_secs = timeout.as_secs(), "draining");
    if !state.in_flight().wait_idle(timeout).await {
        tracing::warn!(still_running = state.in_flight().count(), "drain timeout reached; aborting the rest");
    }
}

/// Waits for the HTTP server's graceful end, briefly; connections still open after that
/// are dropped with the runtime.
pub async fn stop_server(server: JoinHandle<std::io::Result<()>>) {
    match tokio::time::timeout(CLOSE_CONNECTIONS, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!("HTTP server error while stopping: {e}"),
        Ok(Err(e)) => tracing::warn!("HTTP server task failed: {e}"),
        Err(_) => tracing::warn!("connections still open after {CLOSE_CONNECTIONS:?}; closing them"),
    }
}
