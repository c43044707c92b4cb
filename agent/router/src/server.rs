//! Wiring and lifecycle: discovery feeding the pool, the HTTP server, and the drain on
//! SIGTERM (stop taking requests, let in-flight ones finish up to the drain timeout).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use axum::serve::ListenerExt;
use dlengine_cli::RouterArgs;
use dlengine_registry::{discovery_prefix, Discovery, DiscoveryConfig, DiscoveryHandle, EtcdConfig};
use tokio::net::TcpListener;

use crate::config::RouterConfig;
use crate::gateway::{self, Gateway};
use crate::metrics::Metrics;
use crate::policy::{self, Policy};
use crate::proxy::{Proxy, ProxySettings};
use crate::workers::{BreakerPolicy, WorkerPool};

/// `dlengine router`: runs until SIGTERM or Ctrl-C, then drains.
pub async fn run(args: RouterArgs) -> anyhow::Result<()> {
    let config = RouterConfig::from_args(&args)?;
    let listener = TcpListener::bind((config.host.as_str(), config.port))
        .await
        .with_context(|| format!("binding {}:{}", config.host, config.port))?;
    run_with_config(config, listener, shutdown_signal()).await
}

/// The router on an already bound listener, until `shutdown` resolves.
pub async fn run_with_config(config: RouterConfig, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let pool = Arc::new(WorkerPool::new(BreakerPolicy::default()));
    let policy = policy::build(config.policy);
    let discovery = Discovery::spawn(DiscoveryConfig {
        etcd: EtcdConfig::new(config.etcd_endpoints.clone()).with_tls(config.etcd_tls.clone()),
        prefix: discovery_prefix(&config.namespace, config.deployment.as_deref()),
    });
    tokio::spawn(follow_discovery(&discovery, pool.clone(), policy.clone(), metrics.clone()));
    let settings = ProxySettings {
        max_retries: config.max_retries,
        request_timeout: config.request_timeout,
        idle_timeout: config.idle_timeout,
    };
    let proxy = Proxy::new(pool.clone(), policy.clone(), metrics.clone(), settings);
    let gateway = Arc::new(Gateway::new(&config, proxy, pool, metrics, discovery.connected()));
    let app = gateway::router(gateway.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let address = listener.local_addr()?;
    tracing::info!(%address, policy = policy.name(), etcd = ?config.etcd_endpoints, "router listening");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Without TCP_NODELAY a streamed chunk written right after the response headers waits
    // for their ACK, which a keep-alive client delays by up to 40 ms.
    let listener = listener.tap_io(|socket| {
        let _ = socket.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    let mut server = tokio::spawn(async move { server.await });
    tokio::select! {
        finished = &mut server => return finished.context("router server task")?.context("router server"),
        _ = shutdown => {}
    }
    gateway.draining.store(true, Ordering::Relaxed);
    tracing::info!(timeout = ?config.drain_timeout, "draining");
    let _ = stop_tx.send(());
    match tokio::time::timeout(config.drain_timeout, &mut server).await {
        Ok(finished) => finished.context("router server task")?.context("router server")?,
        Err(_) => {
            tracing::warn!("drain timeout passed with requests still in flight; exiting");
            server.abort();
        }
    }
    drop(discovery);
    Ok(())
}

/// Applies every discovery view to the pool; policies forget workers that left.
fn follow_discovery(
    discovery: &DiscoveryHandle,
    pool: Arc<WorkerPool>,
    policy: Arc<dyn Policy>,
    metrics: Arc<Metrics>,
) -> impl Future<Output = ()> + Send + 'static {
    let mut view = discovery.subscribe();
    let mut connected = discovery.connected();
    async move {
        loop {
            let current = view.borrow_and_update().clone();
            let changes = pool.sync(&current);
            for worker in &changes.added {
                tracing::info!(worker = %worker.url(), model = %worker.record.served_model_name, role = worker.record.role.as_str(), "worker joined");
            }
            for worker in &changes.removed {
                tracing::info!(worker = %worker.url(), "worker left");
                policy.forget(worker);
            }
            metrics.workers.set(pool.snapshot().len() as i64);
            metrics.etcd_connected.set(i64::from(*connected.borrow_and_update()));
            tokio::select! {
                changed = view.changed() => if changed.is_err() { return },
                changed = connected.changed() => if changed.is_err() { return },
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!("cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutdown signal received");
}
