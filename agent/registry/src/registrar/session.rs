//! The registrar task: connect, hold the lease, publish load; on any failure back off and
//! start over, keeping the lease id so a short etcd outage does not churn the key.

use std::time::Duration;

use etcd_client::{Client, LeaseKeeper, PutOptions};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use super::{LoadFn, Phase, RegistrarConfig, RegistrationStatus};
use crate::backoff::Backoff;
use crate::error::RegistryError;
use crate::key::RegistryKey;
use crate::record::{Load, WorkerRecord};

/// How one connected session ended.
enum SessionEnd {
    /// Shutdown was asked for and the lease is revoked (or revocation was attempted).
    ShutDown,
}

struct Registration {
    config: RegistrarConfig,
    key: String,
    record: WorkerRecord,
    load: LoadFn,
    /// The lease of the last session; reused after a reconnect if etcd still knows it.
    lease_id: Option<i64>,
    status: watch::Sender<RegistrationStatus>,
}

pub(super) async fn run(
    config: RegistrarConfig,
    record: WorkerRecord,
    load: LoadFn,
    mut phase: watch::Receiver<Phase>,
    status: watch::Sender<RegistrationStatus>,
) {
    if !wait_until_ready(&mut phase).await {
        let _ = status.send(RegistrationStatus::Stopped);
        return;
    }
    let key = RegistryKey::of_record(&record).render();
    let mut registration = Registration { config, key, record, load, lease_id: None, status };
    registration.run(&mut phase).await;
    let _ = registration.status.send(RegistrationStatus::Stopped);
}

/// False when shutdown came first.
async fn wait_until_ready(phase: &mut watch::Receiver<Phase>) -> bool {
    match phase.wait_for(|p| *p != Phase::Starting).await {
        Ok(p) => *p == Phase::Ready,
        Err(_) => false,
    }
}

fn shutting_down(phase: &watch::Receiver<Phase>) -> bool {
    *phase.borrow() == Phase::ShuttingDown
}

impl Registration {
    async fn run(&mut self, phase: &mut watch::Receiver<Phase>) {
        let mut backoff = Backoff::default();
        loop {
            if shutting_down(phase) {
                self.revoke_without_session().await;
                return;
            }
            match self.session(phase, &mut backoff).await {
                Ok(SessionEnd::ShutDown) => return,
                Err(error) => {
                    if let RegistryError::LeaseLost { .. } = error {
                        self.lease_id = None;
                    }
                    tracing::warn!(key = %self.key, "registry: {error}; retrying");
                    let _ = self.status.send(RegistrationStatus::Retrying { reason: error.to_string() });
                }
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = phase.changed() => {}
            }
        }
    }

    /// One connection's worth of registration; returns only on shutdown or failure.
    async fn session(&mut self, phase: &mut watch::Receiver<Phase>, backoff: &mut Backoff) -> Result<SessionEnd, RegistryError> {
        let mut client = self.config.etcd.connect().await?;
        let lease_id = self.acquire_lease(&mut client).await?;
        let mut published = (self.load)();
        self.put_record(&mut client, lease_id, published).await?;
        let (mut keeper, mut responses) = self
            .config
            .etcd
            .call("lease keep-alive", &self.key, client.lease_keep_alive(lease_id))
            .await?;
        tracing::info!(key = %self.key, lease = format_args!("{lease_id:x}"), url = %self.record.url, "registry: registered");
        let _ = self.status.send(RegistrationStatus::Registered { lease_id });
        backoff.reset();

        let mut keep_alive_tick = interval(self.config.keep_alive_interval());
        let mut load_tick = interval(self.config.load_interval);
        let mut last_ack = Instant::now();
        loop {
            tokio::select! {
                _ = keep_alive_tick.tick() => {
                    self.keep_alive(&mut keeper, last_ack).await?;
                }
                response = responses.message() => {
                    check_keep_alive_response(response, lease_id, &self.key)?;
                    last_ack = Instant::now();
                }
                _ = load_tick.tick() => {
                    let load = (self.load)();
                    if load.differs_meaningfully(&published) {
                        self.put_record(&mut client, lease_id, load).await?;
                        published = load;
                    }
                }
                _ = phase.changed() => {
                    if shutting_down(phase) {
                        self.revoke(&mut client, lease_id).await;
                        return Ok(SessionEnd::ShutDown);
                    }
                }
            }
        }
    }

    /// The previous lease if etcd still has it (an etcd restart keeps leases), else a new one.
    async fn acquire_lease(&mut self, client: &mut Client) -> Result<i64, RegistryError> {
        if let Some(lease_id) = self.lease_id {
            let ttl = self.config.etcd.call("lease time-to-live", &self.key, client.lease_time_to_live(lease_id, None)).await?;
            if ttl.ttl() > 0 {
                return Ok(lease_id);
            }
            tracing::info!(key = %self.key, lease = format_args!("{lease_id:x}"), "registry: lease is gone; taking a new one");
        }
        let ttl_secs = self.config.lease_ttl.as_secs() as i64;
        let granted = self.config.etcd.call("lease grant", &self.key, client.lease_grant(ttl_secs, None)).await?;
        self.lease_id = Some(granted.id());
        Ok(granted.id())
    }

    async fn put_record(&mut self, client: &mut Client, lease_id: i64, load: Load) -> Result<(), RegistryError> {
        self.record.load = load;
        let value = self.record.to_json();
        let options = PutOptions::new().with_lease(lease_id);
        self.config.etcd.call("put", &self.key, client.put(self.key.as_str(), value, Some(options))).await?;
        Ok(())
    }

    async fn keep_alive(&self, keeper: &mut LeaseKeeper, last_ack: Instant) -> Result<(), RegistryError> {
        // A lease unanswered for a whole TTL may already be gone on the server: start over
        // rather than keep a key that routers may no longer see.
        if last_ack.elapsed() > self.config.lease_ttl {
            return Err(RegistryError::KeepAlive {
                key: self.key.clone(),
                reason: format!("no answer for {:?}", last_ack.elapsed()),
            });
        }
        keeper
            .keep_alive()
            .await
            .map_err(|source| RegistryError::Etcd { operation: "lease keep-alive", key: self.key.clone(), source })
    }

    async fn revoke(&mut self, client: &mut Client, lease_id: i64) {
        match self.config.etcd.call("lease revoke", &self.key, client.lease_revoke(lease_id)).await {
            Ok(_) => tracing::info!(key = %self.key, "registry: lease revoked"),
            Err(error) => tracing::warn!(key = %self.key, "registry: {error}; the lease will expire by itself"),
        }
        self.lease_id = None;
    }

    /// Shutdown while disconnected: one quick attempt, so a key from a previous session
    /// does not linger for a whole TTL.
    async fn revoke_without_session(&mut self) {
        let Some(lease_id) = self.lease_id else { return };
        match self.config.etcd.connect().await {
            Ok(mut client) => self.revoke(&mut client, lease_id).await,
            Err(error) => tracing::warn!(key = %self.key, "registry: {error}; the lease will expire by itself"),
        }
    }
}

fn check_keep_alive_response(
    response: Result<Option<etcd_client::LeaseKeepAliveResponse>, etcd_client::Error>,
    lease_id: i64,
    key: &str,
) -> Result<(), RegistryError> {
    match response {
        Ok(Some(answer)) if answer.ttl() > 0 => Ok(()),
        Ok(Some(_)) => Err(RegistryError::LeaseLost { lease_id }),
        Ok(None) => Err(RegistryError::KeepAlive { key: key.to_string(), reason: "stream closed by etcd".into() }),
        Err(source) => Err(RegistryError::Etcd { operation: "lease keep-alive", key: key.to_string(), source }),
    }
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

