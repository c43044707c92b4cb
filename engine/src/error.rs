//! Engine errors. Each names the thing that failed.

use std::path::PathBuf;

use crate::sampling_params::InvalidParam;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: corrupt safetensors header: {message}")]
    CorruptHeader { path: PathBuf, message: String },
    #[error("tensor `{tensor}` is missing (looked in {looked_in})")]
    MissingTensor { tensor: String, looked_in: String },
    #[error("tensor `{tensor}` in {path}: expected shape {expected:?}, found {found:?}")]
    WrongShape { tensor: String, path: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{tensor}` in {path}: unsupported dtype {dtype} (supported: BF16, F16, F32)")]
    UnsupportedDtype { tensor: String, path: PathBuf, dtype: String },
    #[error("{path}: unknown architecture {architecture:?} (supported: {supported})")]
    UnknownArchitecture { path: PathBuf, architecture: String, supported: String },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op}: {message}")]
    Op { op: &'static str, message: String },
    #[error("device unavailable: {0}")]
    Unavailable(String),
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    #[error("not implemented on this backend: {0}")]
    Unsupported(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("engine has stopped")]
    Stopped,
    #[error("request failed: {0}")]
    Request(String),
}

/// Why a request was refused before it entered the queue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    InvalidParam(#[from] InvalidParam),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "this model's maximum context length is {max_model_len} tokens, but the request asks for \
         {prompt_tokens} prompt tokens plus {max_tokens} completion tokens ({total} in total)",
        total = prompt_tokens + max_tokens
    )]
    TooLong { prompt_tokens: usize, max_tokens: usize, max_model_len: usize },
    #[error("token id {token_id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfVocab { token_id: u32, vocab_size: usize },
    #[error("the waiting queue is full ({limit} requests); retry later")]
    QueueFull { limit: usize },
    #[error("the engine is not accepting requests (shutting down)")]
    Draining,
}
