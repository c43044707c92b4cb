//! `POST /v1/chat/completions`.

use axum::extract::State;
use axum::response::Response;
use dlengine_engine::request::GenerateRequest;

use super::chat_prompt::chat_prompt;
use super::chat_response::{ChatAnswer, ChatChunks, ChatMessageCollector};
use super::engine_errors::{submit_error, PromptFields};
use super::generation::Generation;
use super::json_body::{parse_request, RawBody};
use super::pd::{self, KvParams};
use super::request_id::RequestId;
use super::sampling::{chat_logprobs, sampling_params, SamplingContext};
use super::sse::sse_response;
use super::state::AppState;
use super::stream_options::include_usage;
use crate::openai::chat::ChatCompletionRequest;
use crate::openai::{ids, ApiError};

pub async fn chat_completions(
    State(state): State<AppState>,
    request_id: RequestId,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    let request = parse_request::<ChatCompletionRequest>(&body)?;
    state.check_model(request.model.as_deref())?;
    let include_usage = include_usage(request.stream, request.stream_options.as_ref())?;
    let kv_params = KvParams::from_body(&body)?;
    kv_params.check_stream(request.stream.unwrap_or(false))?;
    let prompt = chat_prompt(ready, &request, &body)?;
    let engine = &ready.engine;
    let logprobs = chat_logprobs(request.logprobs, request.top_logprobs)?;
    let ctx = SamplingContext {
        defaults: &engine.info().generation_defaults,
        prompt_tokens: prompt.token_ids.len(),
        max_model_len: engine.info().max_model_len,
        logprobs,
    };
    let params = sampling_params(&request.sampling, &ctx)?;
    let n = params.n;
    let fields = PromptFields { prompt: "messages", max_tokens: request.sampling.max_tokens_field().map(|f| f.0) };
    let id = ids::chat_completion_id();
    tracing::debug!(%id, prompt_tokens = prompt.token_ids.len(), "chat request");
    let mut generate = GenerateRequest { request_id: request_id.0, prompt_token_ids: prompt.token_ids, params, kv_transfer: Default::default() };
    engine.check(&generate).map_err(|e| submit_error(e, fields))?;
    let import = ready.pd.apply(engine, state.served_model(), &kv_params, &mut generate).await?;
    let prefill = kv_params.prefill_order(&generate.prompt_token_ids);
    let stream = engine.submit(generate).map_err(|e| submit_error(e, fields))?;
    let lease = import.map(|import| import.follow(&stream));
    let mut generation = Generation::new(vec![stream], state.track_request());
    if let Some(lease) = lease {
        generation.await_import(lease).await?;
    }
    let answer = ChatAnswer {
        id,
        created: ids::unix_now(),
        model: state.served_model().to_owned(),
        n,
        logprobs: logprobs.is_some(),
        include_usage,
        reasoning: prompt.reasoning,
        tool_parser: prompt.tool_parser,
        tokenizer: engine.tokenizer().clone(),
    };
    if request.stream.unwrap_or(false) {
        return Ok(sse_response(generation, ChatChunks::new(answer)));
    }
    pd::answer(&ready.pd, engine, prefill, generation, ChatMessageCollector::new(answer)).await
}
