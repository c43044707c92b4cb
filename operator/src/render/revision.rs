//! Revisions: a short hash of everything that changes what an engine pod runs.
//!
//! The hash is taken over the rendered pod templates of all engine roles together, so
//! prefill and decode always share a revision and any change to either rolls both, while
//! replicas and autoscaling settings (not in a pod template) never create a revision.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use xxhash_rust::xxh3::xxh3_64;

/// Stands in for the revision while the templates that define it are hashed.
pub const PLACEHOLDER: &str = "0";

/// An 8-hex-digit revision of the given engine pod templates (rendered with [`PLACEHOLDER`]).
pub fn hash_templates(templates: &[(String, PodTemplateSpec)]) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(templates)?;
    Ok(format!("{:08x}", xxh3_64(&bytes) as u32))
}
