//! `dlengine-operator`: turns `InferenceDeployment` objects into the Kubernetes objects
//! that run dlengine roles, keeps them up to date, scales them and reports their state.
//!
//! What it owns: the `dlengine.io` API types and their CRD ([`crd`], [`crdgen`]); the pure
//! translation of a spec into desired objects ([`render`]); the controller that applies
//! them and computes status ([`controller`]); the autoscaling policy ([`autoscale`]); the
//! cleanup of a deployment's etcd prefix ([`registry`]); leader election ([`leader`]).
//!
//! What it must not do: link the engine or CUDA, talk to engines other than reading their
//! `/metrics`, or write anything in etcd but the deletion of its own deployments' prefixes.
//! The only contract with the agent is the `dlengine` command line ([`dlengine_cli`]) and the
//! downward-API environment names it exports.

pub mod autoscale;
pub mod cli;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod etcd_bootstrap;
pub mod leader;
pub mod offline;
pub mod registry;
pub mod render;
pub mod validate;

#[cfg(test)]
pub mod testing;
