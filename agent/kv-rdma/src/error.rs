//! Errors. Each names the thing that failed; device errors carry the verb and the device.

use std::time::Duration;

/// Malformed or unsupported metadata received from a peer or the registry.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("RDMA metadata is not valid JSON for {what}: {source}")]
    Json { what: &'static str, source: serde_json::Error },
    #[error("RDMA metadata {what} has no numeric `version` field")]
    MissingVersion { what: &'static str },
    #[error("RDMA metadata {what} has version {found}; this build speaks version {supported}")]
    UnsupportedVersion { what: &'static str, found: u64, supported: u32 },
    #[error("invalid RDMA metadata: {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("RDMA metadata KV layout: {0}")]
    Layout(#[from] LayoutError),
}

impl MetaError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), reason: reason.into() }
    }
}

/// A KV memory layout that cannot describe a real cache, or regions too small for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layout has {placements} layer placements for a {layers}-layer shape")]
    LayerCount { layers: u32, placements: usize },
    #[error("shape {field} is 0")]
    ZeroDimension { field: &'static str },
    #[error("num_blocks is 0")]
    NoBlocks,
    #[error("block stride {stride} is smaller than one block ({block_bytes} bytes)")]
    StrideTooSmall { stride: u64, block_bytes: u64 },
    #[error("layer {layer} {part} lies past the end of the address space (offset {offset})")]
    Overflow { layer: u32, part: KvPart, offset: u64 },
    #[error("layer {a_layer} {a_part} and layer {b_layer} {b_part} overlap in region {region}")]
    Overlap { region: u32, a_layer: u32, a_part: KvPart, b_layer: u32, b_part: KvPart },
    #[error("layer {layer} {part} uses region {region} but only {regions} regions are registered")]
    MissingRegion { layer: u32, part: KvPart, region: u32, regions: usize },
    #[error("region {region} is {len} bytes; the layout needs {needed}")]
    RegionTooSmall { region: u32, len: u64, needed: u64 },
}

/// K or V half of a layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KvPart {
    K,
    V,
}

impl std::fmt::Display for KvPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvPart::K => "K",
            KvPart::V => "V",
        })
    }
}

/// Which end of a transfer a layout or region belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Remote,
    Local,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Remote => "remote",
            Side::Local => "local",
        })
    }
}

/// A read plan that cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{side} KV layout: {source}")]
    Layout { side: Side, source: LayoutError },
    #[error("remote and local KV shapes differ ({remote} vs {local})")]
    ShapeMismatch { remote: String, local: String },
    #[error("{side} region {region} at {addr:#x} + {len} bytes wraps the address space")]
    RegionWraps { side: Side, region: u32, addr: u64, len: u64 },
    #[error("plan options: {0}")]
    Options(String),
    #[error("{side} block {block} is out of range (the cache has {num_blocks} blocks)")]
    BlockOutOfRange { side: Side, block: u32, num_blocks: u32 },
    #[error("local block {block} is the destination of more than one remote block")]
    DuplicateLocalBlock { block: u32 },
}

/// A completion that does not fit the transfer it was reported to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackError {
    #[error("queue pair index {qp} is out of range ({qps} queue pairs)")]
    UnknownQp { qp: usize, qps: usize },
    #[error("completion wr_id {wr_id:#x} belongs to transfer generation {found}, not {expected}")]
    StaleCompletion { wr_id: u64, found: u32, expected: u32 },
    #[error("completion on queue pair {qp} covers {end} work requests but only {posted} were posted")]
    BeyondPosted { qp: usize, end: usize, posted: usize },
    #[error(
        "completion on queue pair {qp} for work request {end} repeats or goes back ({completed} already complete)"
    )]
    Regressed { qp: usize, end: usize, completed: usize },
    #[error("posting {count} work requests on queue pair {qp} exceeds its plan ({posted} of {planned} posted)")]
    OverPosted { qp: usize, count: usize, posted: usize, planned: usize },
}

/// Errors of the device side (and of the crate as a whole).
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// The crate was compiled without verbs support.
    #[error(
        "RDMA is unavailable: this binary was built without the `rdma` feature of dlengine-kv-rdma \
         (rebuild with `--features rdma`, or use --kv-transport tcp or cuda-ipc)"
    )]
    RdmaUnavailable,
    /// libibverbs lists no device (no NIC, no driver, or no soft-RoCE link).
    #[error("no RDMA device found; use --kv-transport tcp or cuda-ipc{}", detail_suffix(.detail))]
    NoDevice { detail: String },
    #[error("RDMA device {name:?} not found (devices: {available})")]
    DeviceNotFound { name: String, available: String },
    /// A verb failed; `source` carries the errno.
    #[error("{op} on {device}: {source}{}", detail_suffix(.hint))]
    Verbs { op: &'static str, device: String, source: std::io::Error, hint: String },
    #[error("port {port} of {device} is {state}, not ACTIVE")]
    PortNotActive { device: String, port: u8, state: String },
    #[error("cannot connect to peer {peer}: {reason}")]
    Incompatible { peer: String, reason: String },
    /// A work request completed with an error status (the QP is now in the error state).
    #[error(
        "RDMA READ failed on {device} QP {qp_num}: {status} (status {code}, vendor error {vendor_err:#x}){}",
        detail_suffix(.request)
    )]
    WorkCompletion { device: String, qp_num: u32, status: String, code: u32, vendor_err: u32, request: String },
    #[error(
        "RDMA READ transfer timed out after {waited:?}: {outstanding} work requests outstanding, \
         {layers_complete} of {layers} layers complete"
    )]
    Timeout { waited: Duration, outstanding: usize, layers_complete: u32, layers: u32 },
    /// A layer-wise transfer's source published no more layers (its forward died or
    /// stalled).
    #[error("the source wrote {layers_ready} of {layers} layers and no more for {waited:?} (its forward failed or stalled)")]
    SourceStalled { waited: Duration, layers_ready: u32, layers: u32 },
    #[error("queue pair {qp_num} on {device} is unusable ({reason}); create and connect a new one")]
    QpUnusable { device: String, qp_num: u32, reason: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("completion tracking: {0}")]
    Track(#[from] TrackError),
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

pub type Result<T, E = RdmaError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_device_message_names_the_alternatives() {
        let plain = RdmaError::NoDevice { detail: String::new() }.to_string();
        assert_eq!(plain, "no RDMA device found; use --kv-transport tcp or cuda-ipc");
        let detailed = RdmaError::NoDevice { detail: "kernel has no RDMA support".into() }.to_string();
        assert!(detailed.starts_with("no RDMA device found; use --kv-transport tcp or cuda-ipc ("), "{detailed}");
    }

    #[test]
    fn a_stalled_source_says_how_far_it_got() {
        let msg = RdmaError::SourceStalled { waited: Duration::from_secs(10), layers_ready: 3, layers: 28 }.to_string();
        assert_eq!(msg, "the source wrote 3 of 28 layers and no more for 10s (its forward failed or stalled)");
    }

    #[test]
    fn unavailable_message_names_the_feature() {
        let msg = RdmaError::RdmaUnavailable.to_string();
        assert!(msg.contains("without the `rdma` feature"), "{msg}");
    }
}
