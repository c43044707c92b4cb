//! `dlengine-registry`: how engines announce themselves in etcd and how routers find them.
//!
//! Owns the registry contract (the [`WorkerRecord`] JSON and the key layout
//! `/dlengine/<namespace>/<deployment>/<revision>/<role>/<instance-id>`), the [`Registrar`]
//! that keeps one engine registered under a lease, and [`Discovery`], the live view a
//! router subscribes to.
//!
//! Must not: serve HTTP, decide routing, or make serving depend on etcd. Everything here
//! runs in background tasks that retry forever; an engine serves whether or not etcd is up.
//! It must not link the engine either, except behind the `engine` feature, which only
//! converts the engine's types into the record's.

mod backoff;
mod connection;
mod discovery;
#[cfg(feature = "engine")]
mod engine;
mod error;
mod identity;
mod key;
mod record;
mod registrar;
mod tls;
#[cfg(feature = "testing")]
pub mod testing;

pub use backoff::Backoff;
pub use connection::EtcdConfig;
pub use discovery::{Discovery, DiscoveryConfig, DiscoveryHandle, WorkerView};
#[cfg(feature = "engine")]
pub use engine::register_engine;
pub use error::RegistryError;
pub use identity::Identity;
pub use key::{discovery_prefix, RegistryKey};
pub use record::{
    unix_millis_now, Capacity, KvLayout, Load, PairingKey, Role, TransferEndpoints, WorkerRecord, PROTOCOL_VERSION,
};
pub use registrar::{LoadFn, Registrar, RegistrarConfig, RegistrarHandle, RegistrationStatus};
pub use tls::EtcdTls;
