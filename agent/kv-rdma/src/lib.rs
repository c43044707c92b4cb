//! RDMA building blocks for moving KV-cache blocks from a prefill engine to a decode
//! engine with one-sided RDMA READ: the decode side reads the prefill side's registered
//! cache directly, the prefill CPU is not involved per transfer.
//!
//! Always compiled (pure Rust, no device needed):
//! - [`meta`]: versioned JSON the engines exchange: [`KvRdmaAdvert`] (endpoint, KV memory
//!   layout, one [`RemoteRegion`] per registered region) and [`ConnectInfo`] (endpoint
//!   plus [`QpInfo`] per queue pair).
//! - [`layout`]: where each (layer, K/V, block) lives in registered memory.
//! - [`plan`]: turns (remote block, local block) pairs into READ work requests,
//!   coalesced, split, balanced over queue pairs, in layer order.
//! - [`tracker`]: outstanding work requests per QP and the layer-completion watermark.
//!
//! With the `rdma` feature, the device side over libibverbs: [`Device`],
//! [`ProtectionDomain`], [`MemoryRegion`] (host memory, or GPU memory through dma-buf),
//! [`QueuePair`] (RC, INIT -> RTR -> RTS) and [`ReadTransfer`] (batched posting, polling,
//! timeouts, errors that name the completion status). Without the feature the same types
//! exist but [`Device::open`] fails with [`RdmaError::RdmaUnavailable`].
//!
//! This crate owns the RDMA mechanics only. It does not decide which engines pair up,
//! does not own the KV cache or its allocation (callers register memory they own and keep
//! it alive), does not talk HTTP or etcd (callers carry the JSON), and never falls back to
//! another transport by itself: it reports errors and the caller chooses.

pub mod config;
pub mod error;
pub mod layout;
pub mod meta;
pub mod plan;
pub mod tracker;

#[cfg(not(feature = "rdma"))]
mod unavailable;
#[cfg(feature = "rdma")]
mod verbs;

#[cfg(not(feature = "rdma"))]
pub use unavailable::{read_blocks, Device, MemoryRegion, ProtectionDomain, QueuePair, ReadTransfer};
#[cfg(feature = "rdma")]
pub use verbs::{read_blocks, Device, MemoryRegion, ProtectionDomain, QueuePair, ReadTransfer};

pub use config::{Access, DeviceLimits, GidSelector, QpConfig, ReadOptions, TransferStats};
pub use error::{KvPart, LayoutError, MetaError, PlanError, RdmaError, Side, TrackError};
pub use layout::{KvMemoryLayout, KvShape, LayerPlacement, Placement};
pub use meta::{ConnectInfo, EndpointInfo, Gid, KvRdmaAdvert, LinkLayer, Mtu, QpInfo, RemoteRegion, META_VERSION};
pub use plan::{LocalRegion, PlanOptions, ReadPlan, ReadPlanner, ReadRequest};
pub use tracker::CompletionTracker;

/// True when this build can talk to RDMA devices (the `rdma` feature is on).
pub const RDMA_COMPILED: bool = cfg!(feature = "rdma");
