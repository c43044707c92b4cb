//! The InferenceDeployment controller: observe children, plan, apply, report.
//!
//! Level-triggered and idempotent: every reconcile recomputes the desired objects from the
//! spec and what it observes, and applies them with server-side apply under one field
//! manager; applying unchanged objects changes nothing.

mod apply;
mod autoscaling;
mod cleanup;
pub mod conditions;
mod context;
mod error;
mod observe;
mod reconcile;
pub mod rollout;
mod run;
pub mod telemetry;

pub use context::{Clock, Context, SystemClock};
pub use error::Error;
pub use reconcile::{error_policy, reconcile, FINALIZER};
pub use run::{run_controller, ControllerConfig};

#[cfg(test)]
mod tests;
