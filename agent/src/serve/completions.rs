//! `POST /v1/completions`: a prompt or a batch of prompts (text or token ids).

use axum::extract::State;
use axum::response::Response;
use dlengine_engine::engine::{Engine, RequestStream};
use dlengine_engine::request::GenerateRequest;

use super::completion_response::{CompletionAnswer, CompletionChunks, CompletionCollector};
use super::engine_errors::{submit_error, PromptFields};
use super::generation::Generation;
use super::json_body::{parse_request, RawBody};
use super::pd::{self, KvParams};
use super::request_id::RequestId;
use super::sampling::{completion_logprobs, sampling_params, SamplingContext};
use super::sse::sse_response;
use super::state::AppState;
use super::stream_options::include_usage;
use crate::openai::completion::{CompletionRequest, PromptInput};
use crate::openai::{ids, ApiError};

/// A prompt ready for the engine, and what `echo` repeats of it.
struct Prepared {
    request: GenerateRequest,
    echo: Option<String>,
}

pub async fn completions(
    State(state): State<AppState>,
    request_id: RequestId,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    let request = parse_request::<CompletionRequest>(&body)?;
    state.check_model(request.model.as_deref())?;
    refuse_unsupported(&request)?;
    let include_usage = include_usage(request.stream, request.stream_options.as_ref())?;
    let kv_params = KvParams::from_body(&body)?;
    kv_params.check_stream(request.stream.unwrap_or(false))?;
    let engine = &ready.engine;
    let fields = PromptFields { prompt: "prompt", max_tokens: request.sampling.max_tokens_field().map(|f| f.0) };
    let mut prepared = prepare(engine, &request, &request_id.0)?;
    for p in &prepared {
        engine.check(&p.request).map_err(|e| submit_error(e, fields))?;
    }
    if !kv_params.is_none() && prepared.len() != 1 {
        return Err(ApiError::invalid_param("prompt", "kv_transfer_params needs exactly one prompt"));
    }
    let mut import = None;
    if let Some(p) = prepared.first_mut() {
        import = ready.pd.apply(engine, state.served_model(), &kv_params, &mut p.request).await?;
    }
    let prefill = prepared.first().and_then(|p| kv_params.prefill_order(&p.request.prompt_token_ids));
    let n = prepared.first().map_or(1, |p| p.request.params.n);
    let echo = prepared.iter().map(|p| p.echo.clone()).collect();
    let streams = submit_all(engine, prepared, fields)?;
    let lease = import.zip(streams.first()).map(|(import, stream)| import.follow(stream));
    let mut generation = Generation::new(streams, state.track_request());
    if let Some(lease) = lease {
        generation.await_import(lease).await?;
    }
    let answer = CompletionAnswer {
        id: ids::completion_id(),
        created: ids::unix_now(),
        model: state.served_model().to_owned(),
        n,
        echo,
        logprobs: request.logprobs.is_some(),
        include_usage,
        tokenizer: engine.tokenizer().clone(),
    };
    if request.stream.unwrap_or(false) {
        return Ok(sse_response(generation, CompletionChunks::new(answer)));
    }
    pd::answer(&ready.pd, engine, prefill, generation, CompletionCollector::new(answer)).await
}

fn refuse_unsupported(request: &CompletionRequest) -> Result<(), ApiError> {
    if request.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix (fill-in-the-middle) is not supported"));
    }
    if request.echo.unwrap_or(false) && request.logprobs.is_some() {
        return Err(ApiError::unsupported(
            "echo",
            "echo together with logprobs is not supported (prompt log-probabilities are not computed)",
        ));
    }
    Ok(())
}

fn prepare(engine: &Engine, request: &CompletionRequest, request_id: &str) -> Result<Vec<Prepared>, ApiError> {
    let inputs = request.prompt.clone().into_inputs();
    if inputs.is_empty() {
        return Err(ApiError::invalid_param("prompt", "prompt must not be an empty list"));
    }
    let logprobs = completion_logprobs(request.logprobs)?;
    let echo = request.echo.unwrap_or(false);
    let info = engine.info();
    let tokenizer = engine.tokenizer();
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| {
            let (token_ids, text) = match input {
                // Raw prompts get the tokenizer's special tokens (e.g. BOS), as in vLLM.
                PromptInput::Text(text) => (
                    tokenizer.encode(&text, true).map_err(|e| ApiError::invalid_param("prompt", format!("cannot tokenize: {e}")))?,
                    Some(text),
                ),
                PromptInput::Tokens(ids) => (ids, None),
            };
            let ctx = SamplingContext {
                defaults: &info.generation_defaults,
                prompt_tokens: token_ids.len(),
                max_model_len: info.max_model_len,
                logprobs,
            };
            let params = sampling_params(&request.sampling, &ctx)?;
            let echo = echo.then(|| text.unwrap_or_else(|| tokenizer.decode(&token_ids, false)));
            let request_id = format!("{request_id}-{i}");
            Ok(Prepared { request: GenerateRequest { request_id, prompt_token_ids: token_ids, params, kv_transfer: Default::default() }, echo })
        })
        .collect()
}

/// Submits every prompt; on a refusal the ones already queued are dropped (aborted).
fn submit_all(engine: &Engine, prepared: Vec<Prepared>, fields: PromptFields) -> Result<Vec<RequestStream>, ApiError> {
    prepared.into_iter().map(|p| engine.submit(p.request).map_err(|e| submit_error(e, fields))).collect()
}
