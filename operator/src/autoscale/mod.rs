//! Autoscaling: a pure policy over load observations ([`policy`]), smoothing windows
//! ([`history`]), and where the load comes from ([`load`], [`prometheus`], [`scrape`]).

pub mod history;
pub mod load;
pub mod policy;
pub mod prometheus;
pub mod scrape;

pub use history::History;
pub use load::{LoadError, LoadSource, RoleLoad};
pub use policy::{decide, Decision, PolicyInput, Reason};

#[cfg(test)]
mod policy_tests;
