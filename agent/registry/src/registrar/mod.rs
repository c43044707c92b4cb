//! Keeps one engine process registered in etcd for as long as it serves.
//!
//! One background task per process: it waits until the engine says it is ready, then holds
//! one lease (TTL ~10 s, keep-alive every TTL/3) with the engine's key attached, publishes
//! load at most once per `load_interval` and only when it changed meaningfully, resumes or
//! replaces the lease after etcd restarts or partitions, and retries with backoff while
//! etcd is unreachable. Serving never waits on any of this, except the bounded lease
//! revocation in [`RegistrarHandle::shutdown`] that makes routers stop sending at once.

mod session;

use std::sync::Arc;
use std::time::Duration;

use dlengine_cli::RegistryArgs;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::connection::EtcdConfig;
use crate::error::RegistryError;
use crate::tls::EtcdTls;
use crate::record::{Load, WorkerRecord};

/// Reads the engine's current load; called from the registrar task about once a second.
pub type LoadFn = Arc<dyn Fn() -> Load + Send + Sync>;

#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    pub etcd: EtcdConfig,
    pub lease_ttl: Duration,
    /// Shortest time between two load writes.
    pub load_interval: Duration,
    /// Longest time `shutdown` spends revoking the lease.
    pub revoke_timeout: Duration,
}

impl RegistrarConfig {
    /// `None` when no etcd endpoints were given: registration is off. Fails on TLS
    /// settings that cannot work (see [`EtcdTls::from_args`]).
    pub fn from_args(args: &RegistryArgs) -> Result<Option<RegistrarConfig>, RegistryError> {
        let endpoints: Vec<String> = args.etcd_endpoints.iter().filter(|e| !e.trim().is_empty()).cloned().collect();
        if endpoints.is_empty() {
            return Ok(None);
        }
        let tls = EtcdTls::from_args(&args.etcd_tls, &endpoints)?;
        // etcd refuses TTLs under its minimum (about 2 s) by raising them; say so up front.
        let ttl_secs = args.lease_ttl_secs.max(2) as u64;
        Ok(Some(RegistrarConfig {
            etcd: EtcdConfig::new(endpoints).with_tls(tls),
            lease_ttl: Duration::from_secs(ttl_secs),
            load_interval: Duration::from_secs(1),
            revoke_timeout: Duration::from_secs(2),
        }))
    }

    fn keep_alive_interval(&self) -> Duration {
        (self.lease_ttl / 3).max(Duration::from_millis(500))
    }
}

/// Where the registration stands, for logs, health pages and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// The engine has not said it is ready yet.
    WaitingForReady,
    /// The key is in etcd under this lease.
    Registered { lease_id: i64 },
    /// etcd could not be reached or the lease was lost; retrying.
    Retrying { reason: String },
    /// The lease was revoked (or the task ended).
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    ShuttingDown,
}

/// The serve side's handle on its registration.
pub struct RegistrarHandle {
    phase: watch::Sender<Phase>,
    status: watch::Receiver<RegistrationStatus>,
    /// `None` once `shutdown` took it.
    task: Option<JoinHandle<()>>,
    revoke_timeout: Duration,
}

pub struct Registrar;

impl Registrar {
    /// Starts the registration task. Nothing is written to etcd before
    /// [`RegistrarHandle::mark_ready`].
    pub fn spawn(config: RegistrarConfig, record: WorkerRecord, load: LoadFn) -> RegistrarHandle {
        let (phase_tx, phase_rx) = watch::channel(Phase::Starting);
        let (status_tx, status_rx) = watch::channel(RegistrationStatus::WaitingForReady);
        let revoke_timeout = config.revoke_timeout;
        let task = tokio::spawn(session::run(config, record, load, phase_rx, status_tx));
        RegistrarHandle { phase: phase_tx, status: status_rx, task: Some(task), revoke_timeout }
    }
}

impl RegistrarHandle {
    /// The model is loaded and `/health` answers OK: register now.
    pub fn mark_ready(&self) {
        self.phase.send_if_modified(|phase| {
            let starting = *phase == Phase::Starting;
            if starting {
                *phase = Phase::Ready;
            }
            starting
        });
    }

    /// Do not hold a `borrow()` of it across an await: it is a read lock that blocks the
    /// registrar's next status update.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Revokes the lease (the key disappears at once for every router) and ends the task.
    /// Bounded in time: an unreachable etcd delays shutdown by at most the revoke timeout
    /// (plus a second), after which the lease simply expires.
    pub async fn shutdown(mut self) {
        let _ = self.phase.send(Phase::ShuttingDown);
        let Some(mut task) = self.task.take() else { return };
        if tokio::time::timeout(self.revoke_timeout + Duration::from_secs(1), &mut task).await.is_err() {
            tracing::warn!("registry: lease revocation did not finish in time; the lease will expire by itself");
            task.abort();
        }
    }
}

/// Dropped without `shutdown` (a crash path): keep-alives stop and the lease expires
/// within its TTL, as if the process had died.
impl Drop for RegistrarHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
