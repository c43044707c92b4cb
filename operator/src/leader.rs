//! Leader election over a `coordination.k8s.io/v1` Lease, so that several operator replicas
//! can run and only one reconciles. Optimistic concurrency (resourceVersion) decides races.
//! A leader that cannot renew within the lease duration must stop acting: the caller exits.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};

use crate::controller::Clock;

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {name}: {source}")]
    Api { name: String, source: kube::Error },
}

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    clock: Arc<dyn Clock>,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration, clock: Arc<dyn Clock>) -> Self {
        LeaseLock { api, name: name.into(), identity: identity.into(), duration, clock }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Takes the lease if free or expired, renews it if held; true when this replica leads.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let now = self.clock.now();
        let existing = self.api.get_opt(&self.name).await.map_err(|e| self.error(e))?;
        let Some(lease) = existing else { return self.create(now).await };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone();
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if !ours && holder.is_some() && !self.expired(&spec, now) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { spec.acquire_time.clone() } else { Some(MicroTime(now)) };
        let mut updated = lease.clone();
        updated.spec = Some(self.spec(now, acquired, transitions));
        self.replace(&updated).await
    }

    /// Gives the lease up at shutdown so a successor need not wait for expiry.
    pub async fn release(&self) -> Result<(), LeaderError> {
        let Some(mut lease) = self.api.get_opt(&self.name).await.map_err(|e| self.error(e))? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        self.replace(&lease).await.map(|_| ())
    }

    fn expired(&self, spec: &LeaseSpec, now: Timestamp) -> bool {
        let Some(renewed) = spec.renew_time.as_ref().map(|t| t.0) else { return true };
        let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(self.duration.as_secs() as i32));
        now.duration_since(renewed) > SignedDuration::from_secs(seconds)
    }

    fn spec(&self, now: Timestamp, acquire_time: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time,
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    async fn create(&self, now: Timestamp) -> Result<bool, LeaderError> {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
            spec: Some(self.spec(now, Some(MicroTime(now)), 0)),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    /// A replace carries the resourceVersion read: losing a race is a 409, not a split brain.
    async fn replace(&self, lease: &Lease) -> Result<bool, LeaderError> {
        match self.api.replace(&self.name, &PostParams::default(), lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.error(e)),
        }
    }

    fn error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api { name: self.name.clone(), source }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::testing::fake_api::FakeApi;

    struct ManualClock(Mutex<i64>);

    impl Clock for ManualClock {
        fn now(&self) -> Timestamp {
            Timestamp::from_second(*self.0.lock().unwrap()).unwrap()
        }
    }

    fn lock(api: &FakeApi, who: &str, clock: Arc<ManualClock>) -> LeaseLock {
        LeaseLock::new(Api::namespaced(api.client(), "ops"), "dlengine-operator", who, Duration::from_secs(15), clock)
    }

    #[tokio::test]
    async fn one_leader_at_a_time_and_takeover_after_expiry() {
        let api = FakeApi::default();
        let clock = Arc::new(ManualClock(Mutex::new(1_000)));
        let (a, b) = (lock(&api, "a", clock.clone()), lock(&api, "b", clock.clone()));
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap());
        *clock.0.lock().unwrap() += 10;
        assert!(a.try_acquire_or_renew().await.unwrap(), "renewal");
        *clock.0.lock().unwrap() += 10;
        assert!(!b.try_acquire_or_renew().await.unwrap(), "renewed 10 s ago: still held");
        *clock.0.lock().unwrap() += 20;
        assert!(b.try_acquire_or_renew().await.unwrap(), "expired: taken over");
        assert!(!a.try_acquire_or_renew().await.unwrap(), "the old leader learns it lost");
        let lease = api.get("apis/coordination.k8s.io/v1", "leases", "ops", "dlengine-operator").unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    }

    #[tokio::test]
    async fn release_hands_over_without_waiting() {
        let api = FakeApi::default();
        let clock = Arc::new(ManualClock(Mutex::new(1_000)));
        let (a, b) = (lock(&api, "a", clock.clone()), lock(&api, "b", clock.clone()));
        assert!(a.try_acquire_or_renew().await.unwrap());
        b.release().await.unwrap();
        assert!(!b.try_acquire_or_renew().await.unwrap(), "a follower's release changes nothing");
        a.release().await.unwrap();
        assert!(b.try_acquire_or_renew().await.unwrap());
    }
}
