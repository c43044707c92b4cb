//! OpenAI wire types, shared by the engine server and the router.
//!
//! Plain serde data: no engine types and no server logic live here, so the router can
//! parse, forward and answer with the very same shapes. Requests accept the vLLM
//! extensions (top_k, min_p, repetition_penalty, stop_token_ids, ...) next to OpenAI's
//! fields; unknown fields are ignored, as OpenAI clients send extras freely.

// The router reuses the parts of these types the engine server does not touch (response
// deserialization, constructors), so not every item is used by this binary yet.
#![allow(dead_code)]

pub mod chat;
pub mod completion;
pub mod error;
pub mod ids;
pub mod logprobs;
pub mod models;
pub mod sampling;
pub mod tools;
pub mod usage;

pub use error::ApiError;
