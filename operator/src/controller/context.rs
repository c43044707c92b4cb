//! What every reconcile shares: clients, operator settings, autoscaler memory, metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;

use crate::autoscale::{History, LoadSource};
use crate::registry::RegistryCleaner;
use crate::render::RenderContext;

use super::telemetry::Metrics;

/// Time as data, so status transitions and stabilization windows are testable.
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

pub struct Context {
    pub client: Client,
    pub render: RenderContext,
    pub registry: Arc<dyn RegistryCleaner>,
    pub load: Arc<dyn LoadSource>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
    /// Autoscaler recommendations per `namespace/deployment/role`.
    pub histories: Mutex<HashMap<String, History>>,
}

impl Context {
    pub fn new(
        client: Client,
        render: RenderContext,
        registry: Arc<dyn RegistryCleaner>,
        load: Arc<dyn LoadSource>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Context {
        let reporter = Reporter { controller: crate::render::labels::MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            render,
            registry,
            load,
            metrics,
            clock,
            histories: Mutex::new(HashMap::new()),
        }
    }
}
