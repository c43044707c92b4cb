//! The router's side of discovery: workers with their load, in-flight counts and circuit
//! breakers, kept in step with the etcd view.

mod breaker;
mod pool;
mod worker;

pub use breaker::{Admission, BreakerPolicy, BreakerState, CircuitBreaker};
pub use pool::{PoolChanges, PoolSnapshot, WorkerPool};
pub use worker::{Worker, WorkerId};
