//! Registrar and Discovery against a real etcd (Debian's `etcd-server`), started on free
//! ports; every test is skipped with a printed reason when the binary is absent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dlengine_registry::testing::EtcdServer;
use dlengine_registry::{
    discovery_prefix, Capacity, Discovery, DiscoveryConfig, EtcdConfig, EtcdTls, KvLayout, Load, Registrar, RegistrarConfig,
    RegistrarHandle, RegistrationStatus, Role, TransferEndpoints, WorkerRecord, WorkerView, PROTOCOL_VERSION,
};
use dlengine_cli::EtcdTlsArgs;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(15);

fn record(instance_id: &str) -> WorkerRecord {
    WorkerRecord {
        protocol_version: PROTOCOL_VERSION,
        instance_id: instance_id.into(),
        namespace: "test".into(),
        deployment: "d".into(),
        revision: "1".into(),
        role: Role::Aggregated,
        model: "tiny".into(),
        served_model_name: "tiny".into(),
        url: format!("http://127.0.0.1:1/{instance_id}"),
        kv_layout: KvLayout { layers: 2, kv_heads: 2, head_dim: 16, block_size: 16, dtype: "f32".into() },
        transfer: TransferEndpoints::default(),
        capacity: Capacity { max_seqs: 4, kv_blocks: 32 },
        load: Load::default(),
        started_at: 1,
    }
}

fn registrar_config(etcd: &EtcdServer, ttl_secs: u64) -> RegistrarConfig {
    RegistrarConfig {
        etcd: EtcdConfig::new(vec![etcd.endpoint()]),
        lease_ttl: Duration::from_secs(ttl_secs),
        load_interval: Duration::from_millis(200),
        revoke_timeout: Duration::from_secs(2),
    }
}

fn discovery(etcd: &EtcdServer) -> dlengine_registry::DiscoveryHandle {
    Discovery::spawn(DiscoveryConfig { etcd: EtcdConfig::new(vec![etcd.endpoint()]), prefix: discovery_prefix("test", None) })
}

fn fixed_load(running: Arc<AtomicUsize>) -> dlengine_registry::LoadFn {
    Arc::new(move || Load { running: running.load(Ordering::Relaxed), waiting: 0, kv_usage: 0.0, updated_at: 0 })
}

async fn wait_view(view: &mut watch::Receiver<Arc<WorkerView>>, what: &str, pred: impl Fn(&WorkerView) -> bool) {
    let waited = tokio::time::timeout(WAIT, view.wait_for(|v| pred(v))).await.map(|r| r.is_ok());
    assert_eq!(waited, Ok(true), "timed out waiting for: {what}; view: {:?}", view.borrow());
}

/// True once the status matches. (The `Ref` a watch hands out is a read lock: holding it
/// would block the registrar's next status update, so it is never kept.)
async fn status_reaches(handle: &RegistrarHandle, pred: impl Fn(&RegistrationStatus) -> bool) -> bool {
    let mut status = handle.status();
    let reached = tokio::time::timeout(WAIT, status.wait_for(|s| pred(s))).await.map(|r| r.is_ok());
    reached == Ok(true)
}

async fn wait_registered(handle: &RegistrarHandle) -> i64 {
    let mut status = handle.status();
    let waited = tokio::time::timeout(WAIT, status.wait_for(|s| matches!(s, RegistrationStatus::Registered { .. }))).await;
    match waited.ok().and_then(|r| r.ok()).map(|s| s.clone()) {
        Some(RegistrationStatus::Registered { lease_id }) => lease_id,
        other => panic!("not registered: {other:?}"),
    }
}

const KEY_A: &str = "/dlengine/test/d/1/aggregated/a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_written_before_ready_and_revoke_removes_the_key_at_once() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let discovery = discovery(&etcd);
    let mut view = discovery.subscribe();
    let handle = Registrar::spawn(registrar_config(&etcd, 10), record("a"), fixed_load(Arc::default()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(view.borrow().is_empty(), "registered before ready");
    assert_eq!(*handle.status().borrow(), RegistrationStatus::WaitingForReady);

    handle.mark_ready();
    wait_view(&mut view, "key appears", |v| v.get(KEY_A).is_some()).await;
    assert_eq!(view.borrow().get(KEY_A), Some(&record("a")));

    let started = std::time::Instant::now();
    handle.shutdown().await;
    wait_view(&mut view, "key vanishes on revoke", |v| v.is_empty()).await;
    assert!(started.elapsed() < Duration::from_secs(3), "revocation took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_lease_expires_within_its_ttl() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let discovery = discovery(&etcd);
    let mut view = discovery.subscribe();
    let handle = Registrar::spawn(registrar_config(&etcd, 3), record("a"), fixed_load(Arc::default()));
    handle.mark_ready();
    wait_view(&mut view, "key appears", |v| v.get(KEY_A).is_some()).await;
    // Keep-alives keep it well past the TTL.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(view.borrow().get(KEY_A).is_some(), "key expired while kept alive");
    // A crashed process: keep-alives stop without a revoke.
    drop(handle);
    let gone_by = std::time::Instant::now();
    wait_view(&mut view, "key expires", |v| v.is_empty()).await;
    assert!(gone_by.elapsed() <= Duration::from_secs(6), "expiry took {:?}", gone_by.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_published_when_it_changes_and_not_otherwise() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let discovery = discovery(&etcd);
    let mut view = discovery.subscribe();
    let running = Arc::new(AtomicUsize::new(0));
    let handle = Registrar::spawn(registrar_config(&etcd, 10), record("a"), fixed_load(running.clone()));
    handle.mark_ready();
    wait_view(&mut view, "key appears", |v| v.get(KEY_A).is_some()).await;
    let revision = view.borrow().revision();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(view.borrow().revision(), revision, "unchanged load was written again");

    running.store(5, Ordering::Relaxed);
    wait_view(&mut view, "load 5 published", |v| v.get(KEY_A).map(|r| r.load.running) == Some(5)).await;
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_survives_etcd_restarts_with_and_without_data() {
    let Some(mut etcd) = EtcdServer::start_or_skip() else { return };
    let handle = Registrar::spawn(registrar_config(&etcd, 3), record("a"), fixed_load(Arc::default()));
    handle.mark_ready();
    let first_lease = wait_registered(&handle).await;

    // Same data: the lease survives, so the registrar keeps it.
    etcd.restart();
    let discovery = discovery(&etcd);
    let mut view = discovery.subscribe();
    wait_view(&mut view, "key after restart", |v| v.get(KEY_A).is_some()).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // longer than the TTL
    assert!(view.borrow().get(KEY_A).is_some(), "key lost after a restart with data");

    // All data lost: the registrar must notice and register again under a new lease.
    etcd.restart_empty();
    wait_view(&mut view, "key re-registered after data loss", |v| v.get(KEY_A).is_some()).await;
    let new_lease = status_reaches(&handle, |s| matches!(s, RegistrationStatus::Registered { lease_id } if *lease_id != first_lease)).await;
    assert!(new_lease, "no new lease: {:?}", handle.status().borrow());
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrar_waits_for_an_unreachable_etcd() {
    let Some(mut etcd) = EtcdServer::start_or_skip() else { return };
    etcd.kill();
    let handle = Registrar::spawn(registrar_config(&etcd, 3), record("a"), fixed_load(Arc::default()));
    handle.mark_ready();
    let retrying = status_reaches(&handle, |s| matches!(s, RegistrationStatus::Retrying { .. })).await;
    assert!(retrying, "status: {:?}", handle.status().borrow());
    etcd.start();
    wait_registered(&handle).await;
    handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_keeps_its_view_while_etcd_is_down_and_resyncs_after() {
    let Some(mut etcd) = EtcdServer::start_or_skip() else { return };
    let discovery = discovery(&etcd);
    let mut view = discovery.subscribe();
    let a = Registrar::spawn(registrar_config(&etcd, 10), record("a"), fixed_load(Arc::default()));
    a.mark_ready();
    wait_view(&mut view, "a appears", |v| v.len() == 1).await;
    let mut connected = discovery.connected();
    etcd.kill();
    let disconnected = tokio::time::timeout(WAIT, connected.wait_for(|c| !*c)).await.map(|r| r.is_ok());
    assert_eq!(disconnected, Ok(true), "discovery did not notice etcd going away");
    assert_eq!(view.borrow().len(), 1, "view dropped while etcd was down");

    // Come back empty; only `b` registers: the resync must drop `a` and add `b`.
    a.shutdown().await;
    etcd.restart_empty();
    let b = Registrar::spawn(registrar_config(&etcd, 10), record("b"), fixed_load(Arc::default()));
    b.mark_ready();
    wait_view(&mut view, "resynced to only b", |v| {
        v.len() == 1 && v.get("/dlengine/test/d/1/aggregated/b").is_some()
    })
    .await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_keeps_following_after_a_compaction() {
    let Some(etcd) = EtcdServer::start_or_skip() else { return };
    let config = EtcdConfig::new(vec![etcd.endpoint()]);
    let mut client = config.connect().await.unwrap();
    let discovery = discovery(&etcd);
    let mut view = discovery.subscribe();
    let mut connected = discovery.connected();
    let up = tokio::time::timeout(WAIT, connected.wait_for(|c| *c)).await.map(|r| r.is_ok());
    assert_eq!(up, Ok(true));
    // Writes outside our prefix, then a compaction at the head: watchers must not break
    // silently, and a later registration must still show up.
    for i in 0..20 {
        client.put(format!("/other/{i}"), "x", None).await.unwrap();
    }
    let head = client.get("/other/0", None).await.unwrap().header().unwrap().revision();
    client.compact(head, None).await.unwrap();
    let a = Registrar::spawn(registrar_config(&etcd, 10), record("a"), fixed_load(Arc::default()));
    a.mark_ready();
    wait_view(&mut view, "a appears after compaction", |v| v.len() == 1).await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_discovery_work_over_tls_with_a_client_certificate() {
    let Some(etcd) = EtcdServer::start_tls_or_skip() else { return };
    let files = etcd.tls_files().expect("a TLS etcd").clone();
    let endpoints = vec![etcd.endpoint()];
    let args = EtcdTlsArgs { etcd_ca_file: Some(files.ca.clone()), etcd_cert_file: Some(files.client_cert), etcd_key_file: Some(files.client_key) };
    let tls = EtcdTls::from_args(&args, &endpoints).unwrap();
    let etcd_config = EtcdConfig::new(endpoints.clone()).with_tls(tls);
    let discovery = Discovery::spawn(DiscoveryConfig { etcd: etcd_config.clone(), prefix: discovery_prefix("test", None) });
    let mut view = discovery.subscribe();
    let config = RegistrarConfig { etcd: etcd_config, ..registrar_config(&etcd, 10) };
    let handle = Registrar::spawn(config, record("a"), fixed_load(Arc::default()));
    handle.mark_ready();
    wait_registered(&handle).await;
    wait_view(&mut view, "the engine, discovered over TLS", |v| v.get(KEY_A).is_some()).await;

    // etcd checks clients: the CA alone is not enough.
    let ca_only = EtcdTlsArgs { etcd_ca_file: Some(files.ca), ..EtcdTlsArgs::default() };
    let config = EtcdConfig::new(endpoints).with_tls(EtcdTls::from_args(&ca_only, &[etcd.endpoint()]).unwrap());
    let refused = match config.connect().await {
        Err(_) => true,
        Ok(mut client) => config.call("get", KEY_A, client.get(KEY_A, None)).await.is_err(),
    };
    assert!(refused, "etcd served a client without a certificate");
    handle.shutdown().await;
}
