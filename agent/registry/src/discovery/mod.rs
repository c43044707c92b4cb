//! A live view of the engines registered under a prefix.
//!
//! List the prefix, then watch from the listed revision + 1 so no change between the two is
//! missed. A watch error, a closed stream, or a compaction that got ahead of the watch all
//! lead to a full re-list. While etcd is unreachable the last view stays published: routing
//! goes on with what was known, which is better than routing to nothing.

mod view;

use std::sync::Arc;

use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchResponse};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use view::WorkerView;

use crate::backoff::Backoff;
use crate::connection::EtcdConfig;
use crate::error::RegistryError;

#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub etcd: EtcdConfig,
    /// Ends in `/`; see [`crate::key::discovery_prefix`].
    pub prefix: String,
}

pub struct Discovery;

/// Owns the watch task; dropping it stops the task.
pub struct DiscoveryHandle {
    view: watch::Receiver<Arc<WorkerView>>,
    connected: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Discovery {
    pub fn spawn(config: DiscoveryConfig) -> DiscoveryHandle {
        let (view_tx, view_rx) = watch::channel(Arc::new(WorkerView::default()));
        let (connected_tx, connected_rx) = watch::channel(false);
        let task = tokio::spawn(run(config, view_tx, connected_tx));
        DiscoveryHandle { view: view_rx, connected: connected_rx, task }
    }
}

impl DiscoveryHandle {
    /// The current view; `changed()` on the receiver wakes on every update.
    pub fn subscribe(&self) -> watch::Receiver<Arc<WorkerView>> {
        self.view.clone()
    }

    /// Whether the watch is currently established (false while etcd is unreachable).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }
}

impl Drop for DiscoveryHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(config: DiscoveryConfig, view: watch::Sender<Arc<WorkerView>>, connected: watch::Sender<bool>) {
    let mut backoff = Backoff::default();
    loop {
        let error = sync_and_watch(&config, &view, &connected, &mut backoff).await;
        connected.send_replace(false);
        tracing::warn!(prefix = %config.prefix, workers = view.borrow().len(), "discovery: {error}; keeping the last view and resyncing");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Lists, then follows the watch until it fails; returns why it stopped.
async fn sync_and_watch(
    config: &DiscoveryConfig,
    view: &watch::Sender<Arc<WorkerView>>,
    connected: &watch::Sender<bool>,
    backoff: &mut Backoff,
) -> RegistryError {
    let mut client = match config.etcd.connect().await {
        Ok(client) => client,
        Err(error) => return error,
    };
    let listed = match list(config, &mut client).await {
        Ok(listed) => listed,
        Err(error) => return error,
    };
    let start_revision = listed.revision() + 1;
    tracing::info!(prefix = %config.prefix, workers = listed.len(), revision = listed.revision(), "discovery: listed");
    view.send_replace(Arc::new(listed));
    let options = WatchOptions::new().with_prefix().with_start_revision(start_revision).with_progress_notify();
    let mut stream = match config.etcd.call("watch", &config.prefix, client.watch(config.prefix.as_str(), Some(options))).await {
        Ok(stream) => stream,
        Err(error) => return error,
    };
    connected.send_replace(true);
    backoff.reset();
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return watch_ended(config, "stream closed by etcd"),
            Err(e) => return watch_ended(config, &e.to_string()),
        };
        if response.canceled() || response.compact_revision() > 0 {
            let reason = format!("watch cancelled ({}; compacted at {})", response.cancel_reason(), response.compact_revision());
            return watch_ended(config, &reason);
        }
        apply(view, &response);
    }
}

async fn list(config: &DiscoveryConfig, client: &mut Client) -> Result<WorkerView, RegistryError> {
    let options = GetOptions::new().with_prefix();
    let response = config.etcd.call("list", &config.prefix, client.get(config.prefix.as_str(), Some(options))).await?;
    let mut listed = WorkerView::default();
    for kv in response.kvs() {
        listed.put(&String::from_utf8_lossy(kv.key()), kv.value());
    }
    listed.set_revision(response.header().map(|h| h.revision()).unwrap_or(0));
    Ok(listed)
}

fn apply(view: &watch::Sender<Arc<WorkerView>>, response: &WatchResponse) {
    if response.events().is_empty() {
        return; // created or progress notification
    }
    let mut next = WorkerView::clone(&view.borrow());
    for event in response.events() {
        let Some(kv) = event.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        match event.event_type() {
            EventType::Put => next.put(&key, kv.value()),
            EventType::Delete => next.delete(&key),
        }
        next.set_revision(kv.mod_revision());
    }
    view.send_replace(Arc::new(next));
}

fn watch_ended(config: &DiscoveryConfig, reason: &str) -> RegistryError {
    RegistryError::WatchEnded { prefix: config.prefix.clone(), reason: reason.to_string() }
}
