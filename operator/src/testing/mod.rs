//! Test helpers: the example manifests as typed samples, and an in-memory API server.

pub mod fake_api;
pub mod samples;
