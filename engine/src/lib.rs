//! dlengine's model execution engine: loading a Hugging Face model directory, running it on
//! a [`backend::Backend`], and serving many requests at once with a paged KV cache,
//! continuous batching, chunked prefill and prefix caching.
//!
//! What it must not do: HTTP, registries or anything about other processes (that is the
//! agent's), or device-specific code outside `backend` (model and scheduler code is
//! written once for every backend).

pub mod backend;
pub mod config;
pub mod detokenizer;
pub mod engine;
pub mod engine_core;
pub mod error;
pub mod executor;
pub mod host_overhead;
pub mod kv;
pub mod kv_transfer;
pub mod models;
pub mod output_processor;
pub mod request;
pub mod sampler;
pub mod sampling_params;
pub mod scheduler;
pub mod sequence;
pub mod stats;
mod step_input_builder;
pub mod stop_strings;
pub mod tokenizer;
pub mod weights;
