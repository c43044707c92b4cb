//! The `dlengine.io/v1alpha1` API: `InferenceDeployment` and `InferenceRoleScaler`.
//!
//! Types here are pure data plus the schema rules the apiserver enforces (CEL in
//! `x-kubernetes-validations`); semantic checks the schema cannot express live in
//! [`crate::validate`], and everything derived from a spec lives in [`crate::render`].

mod autoscaling;
mod deployment;
mod model;
mod network;
mod parallelism;
mod pod_overrides;
mod registry;
mod role;
mod rollout;
mod scaler;
mod status;

pub use autoscaling::{Actuator, AutoscalingSpec, FollowRole, HpaSpec, MetricTargets, ScalingBehavior};
pub use deployment::{ApiKeySecret, InferenceDeployment, InferenceDeploymentSpec};
pub use model::{HostPathSource, ImageSource, ModelSource, ModelSpec, PvcSource};
pub use network::{KvTransport, NetworkSpec, RdmaAttachment};
pub use parallelism::Parallelism;
pub use pod_overrides::PodOverrides;
pub use registry::RegistrySpec;
pub use role::{ProbeBudget, RoleKind, RoleSpec, DEFAULT_STARTUP_SECONDS};
pub use rollout::RolloutSpec;
pub use scaler::{InferenceRoleScaler, InferenceRoleScalerSpec, InferenceRoleScalerStatus};
pub use status::{Condition, InferenceDeploymentStatus, RoleStatus, ScalingDecision};

/// API group of every dlengine custom resource.
pub const GROUP: &str = "dlengine.io";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

#[cfg(test)]
mod cel_tests;
