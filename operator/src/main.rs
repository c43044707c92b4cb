//! `dlengine-operator run | crd | render`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use dlengine_operator::autoscale::scrape::MetricsScraper;
use dlengine_operator::cli::{self, Command, LogFormat, RunArgs};
use dlengine_operator::controller::telemetry::{self, Metrics};
use dlengine_operator::controller::{run_controller, Context, ControllerConfig, SystemClock};
use dlengine_operator::leader::LeaseLock;
use dlengine_operator::registry::EtcdRegistry;
use dlengine_operator::render::RenderContext;
use dlengine_operator::{crdgen, etcd_bootstrap, offline};
use tokio::sync::watch;

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("{}", cli::one_line(&error));
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Crd => print_crds(),
        Command::Render(args) => render(args),
        Command::Run(args) => run(args),
        Command::EtcdConfig(args) => etcd_config(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("dlengine-operator: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds() -> anyhow::Result<()> {
    print!("{}", crdgen::crds_yaml().context("serialising the CRDs")?);
    Ok(())
}

fn render(args: cli::RenderArgs) -> anyhow::Result<()> {
    let ctx = RenderContext { default_etcd_endpoints: args.default_etcd_endpoints, default_etcd_tls_secret: None };
    let written = offline::render_to_dir(&args.inputs, &args.output_dir, &args.namespace, &ctx)?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

fn etcd_config(args: cli::EtcdConfigArgs) -> anyhow::Result<()> {
    let layout = etcd_bootstrap::MemberLayout {
        name: args.name,
        statefulset: args.statefulset,
        headless_service: args.headless_service,
        namespace: args.namespace,
        replicas: args.replicas,
        data_dir: args.data_dir,
        tls_dir: args.tls_dir,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    let config = runtime.block_on(etcd_bootstrap::bootstrap(&layout, &args.out))?;
    println!("{} joins as {} ({})", config.name, config.initial_cluster_state, config.initial_cluster);
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(forward_signals(stop_tx));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr).await.with_context(|| format!("binding {}", args.metrics_addr))?;
    tokio::spawn(serve_metrics(listener, metrics.clone()));
    // Followers are ready too: they are healthy standbys, and an operator rollout must not stall on them.
    metrics.set_ready(true);
    let lease = if args.leader_elect {
        match acquire_leadership(&client, &args, stop_rx.clone()).await? {
            Some(lock) => Some(Arc::new(lock)),
            None => {
                tracing::info!("stopped before becoming leader");
                return Ok(());
            }
        }
    } else {
        None
    };
    metrics.is_leader.set(1);
    let context = Arc::new(Context::new(
        client.clone(),
        RenderContext { default_etcd_endpoints: args.default_etcd_endpoints.clone(), default_etcd_tls_secret: args.default_etcd_tls_secret.clone() },
        Arc::new(EtcdRegistry),
        Arc::new(MetricsScraper::new(client.clone())),
        metrics.clone(),
        Arc::new(SystemClock),
    ));
    let config = ControllerConfig { namespace: args.watch_namespace.clone(), concurrency: args.concurrency };
    let renewing = lease.clone().map(|lock| tokio::spawn(keep_leading(lock, Duration::from_secs(args.lease_duration_secs))));
    tracing::info!(namespace = ?args.watch_namespace, "controller starting");
    run_controller(context, config, wait_for_stop(stop_rx)).await;
    if let Some(task) = renewing {
        task.abort();
    }
    if let Some(lock) = lease {
        if let Err(error) = lock.release().await {
            tracing::warn!(%error, "could not release the leader lease");
        }
    }
    tracing::info!("controller stopped");
    Ok(())
}

async fn acquire_leadership(client: &kube::Client, args: &RunArgs, mut stop: watch::Receiver<bool>) -> anyhow::Result<Option<LeaseLock>> {
    let namespace = args.lease_namespace.clone().context("--lease-namespace (or POD_NAMESPACE) is required for leader election")?;
    let identity = args.identity.clone().or_else(|| std::env::var("HOSTNAME").ok()).context("--identity (or POD_NAME) is required for leader election")?;
    let duration = Duration::from_secs(args.lease_duration_secs);
    let lock = LeaseLock::new(kube::Api::namespaced(client.clone(), &namespace), &args.lease_name, &identity, duration, Arc::new(SystemClock));
    loop {
        match lock.try_acquire_or_renew().await {
            Ok(true) => {
                tracing::info!(identity, lease = %args.lease_name, "became leader");
                return Ok(Some(lock));
            }
            Ok(false) => tracing::debug!("another replica leads"),
            Err(error) => tracing::warn!(%error, "leader election"),
        }
        tokio::select! {
            _ = tokio::time::sleep(duration / 3) => {}
            _ = stop.changed() => return Ok(None),
        }
    }
}

/// Renews the lease; a leader that loses it, or cannot renew for a whole lease duration,
/// exits at once, because another replica may already be reconciling.
async fn keep_leading(lock: Arc<LeaseLock>, duration: Duration) {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(duration / 3).await;
        match lock.try_acquire_or_renew().await {
            Ok(true) => last_renewed = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(identity = lock.identity(), "leadership lost; exiting");
                std::process::exit(1);
            }
            Err(error) => tracing::warn!(%error, "lease renewal failed"),
        }
        if last_renewed.elapsed() > duration {
            tracing::error!("could not renew the lease for a whole lease duration; exiting");
            std::process::exit(1);
        }
    }
}

async fn forward_signals(stop: watch::Sender<bool>) {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = stop.send(true);
}

async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    if let Err(error) = axum::serve(listener, telemetry::router(metrics)).await {
        tracing::error!(%error, "metrics server stopped");
    }
}
