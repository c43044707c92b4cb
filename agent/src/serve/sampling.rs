//! The request's sampling fields to engine `SamplingParams`: model defaults from
//! generation_config.json where a field is absent, the remaining context as the default
//! length limit, and errors that name the field the client wrote.

use dlengine_engine::config::GenerationDefaults;
use dlengine_engine::sampling_params::SamplingParams;

use crate::openai::sampling::SamplingFields;
use crate::openai::ApiError;

/// What the sampling parameters depend on besides the request's fields.
pub struct SamplingContext<'a> {
    pub defaults: &'a GenerationDefaults,
    pub prompt_tokens: usize,
    pub max_model_len: usize,
    /// Top alternatives per token, when log-probabilities were asked for.
    pub logprobs: Option<usize>,
}

pub fn sampling_params(fields: &SamplingFields, ctx: &SamplingContext<'_>) -> Result<SamplingParams, ApiError> {
    refuse_unsupported(fields)?;
    let base = SamplingParams::default();
    let d = ctx.defaults;
    let params = SamplingParams {
        n: positive("n", fields.n)?.unwrap_or(base.n),
        temperature: float(fields.temperature).or(d.temperature).unwrap_or(base.temperature),
        top_p: float(fields.top_p).or(d.top_p).unwrap_or(base.top_p),
        top_k: top_k(fields.top_k)?.or(d.top_k).unwrap_or(base.top_k),
        min_p: float(fields.min_p).or(d.min_p).unwrap_or(base.min_p),
        seed: fields.seed,
        presence_penalty: float(fields.presence_penalty).unwrap_or(base.presence_penalty),
        frequency_penalty: float(fields.frequency_penalty).unwrap_or(base.frequency_penalty),
        repetition_penalty: float(fields.repetition_penalty).or(d.repetition_penalty).unwrap_or(base.repetition_penalty),
        max_tokens: max_tokens(fields)?.unwrap_or_else(|| ctx.max_model_len.saturating_sub(ctx.prompt_tokens).max(1)),
        min_tokens: non_negative("min_tokens", fields.min_tokens)?.unwrap_or(base.min_tokens),
        stop: fields.stop.clone().map(|s| s.into_vec()).unwrap_or_default(),
        stop_token_ids: fields.stop_token_ids.clone().unwrap_or_default(),
        include_stop_str_in_output: fields.include_stop_str_in_output.unwrap_or(base.include_stop_str_in_output),
        ignore_eos: fields.ignore_eos.unwrap_or(base.ignore_eos),
        logprobs: ctx.logprobs,
        skip_special_tokens: fields.skip_special_tokens.unwrap_or(base.skip_special_tokens),
    };
    params.validate().map_err(|e| ApiError::invalid_param(client_name(e.param, fields), e.to_string()))?;
    Ok(params)
}

fn refuse_unsupported(fields: &SamplingFields) -> Result<(), ApiError> {
    if let Some(best_of) = fields.best_of {
        if best_of != fields.n.unwrap_or(1) {
            return Err(ApiError::unsupported("best_of", "best_of other than n is not supported"));
        }
    }
    if fields.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::unsupported("logit_bias", "logit_bias is not supported"));
    }
    Ok(())
}

/// The engine names `max_tokens`; the client may have written `max_completion_tokens`.
fn client_name(param: &'static str, fields: &SamplingFields) -> &'static str {
    match (param, fields.max_tokens_field()) {
        ("max_tokens", Some((name, _))) => name,
        _ => param,
    }
}

fn float(v: Option<f64>) -> Option<f32> {
    v.map(|x| x as f32)
}

fn positive(param: &'static str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        Some(x) if x < 1 => Err(ApiError::invalid_param(param, format!("{param} must be at least 1, got {x}"))),
        other => Ok(other.map(|x| x as usize)),
    }
}

fn non_negative(param: &'static str, v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        Some(x) if x < 0 => Err(ApiError::invalid_param(param, format!("{param} must not be negative, got {x}"))),
        other => Ok(other.map(|x| x as usize)),
    }
}

/// vLLM's convention: 0 or -1 turns the top-k cut off.
fn top_k(v: Option<i64>) -> Result<Option<usize>, ApiError> {
    match v {
        Some(-1) => Ok(Some(0)),
        other => non_negative("top_k", other),
    }
}

fn max_tokens(fields: &SamplingFields) -> Result<Option<usize>, ApiError> {
    match fields.max_tokens_field() {
        Some((name, value)) => positive(name, Some(value)),
        None => Ok(None),
    }
}

/// Top alternatives for the completions API's `logprobs` (an integer).
pub fn completion_logprobs(v: Option<i64>) -> Result<Option<usize>, ApiError> {
    non_negative("logprobs", v)
}

/// The chat API's `logprobs` (bool) and `top_logprobs` (integer).
pub fn chat_logprobs(logprobs: Option<bool>, top_logprobs: Option<i64>) -> Result<Option<usize>, ApiError> {
    let top = non_negative("top_logprobs", top_logprobs)?;
    match (logprobs.unwrap_or(false), top) {
        (false, Some(_)) => Err(ApiError::invalid_param("top_logprobs", "top_logprobs requires logprobs to be true")),
        (false, None) => Ok(None),
        (true, top) => {
            let k = top.unwrap_or(0);
            if k > dlengine_engine::sampling_params::MAX_LOGPROBS {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and {}, got {k}", dlengine_engine::sampling_params::MAX_LOGPROBS),
                ));
            }
            Ok(Some(k))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: &str) -> SamplingFields {
        serde_json::from_str(json).unwrap()
    }

    fn build(json: &str, defaults: &GenerationDefaults) -> Result<SamplingParams, ApiError> {
        let ctx = SamplingContext { defaults, prompt_tokens: 10, max_model_len: 100, logprobs: None };
        sampling_params(&fields(json), &ctx)
    }

    #[test]
    fn every_field_maps() {
        let p = build(
            r#"{"n": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "seed": 7,
                "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.1,
                "max_tokens": 20, "min_tokens": 3, "stop": "x", "stop_token_ids": [4],
                "include_stop_str_in_output": true, "ignore_eos": true, "skip_special_tokens": false}"#,
            &GenerationDefaults::default(),
        )
        .unwrap();
        assert_eq!((p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed), (2, 0.5, 0.9, 5, 0.1, Some(7)));
        assert_eq!((p.presence_penalty, p.frequency_penalty, p.repetition_penalty), (0.1, 0.2, 1.1));
        assert_eq!((p.max_tokens, p.min_tokens), (20, 3));
        assert_eq!((p.stop, p.stop_token_ids), (vec!["x".to_owned()], vec![4]));
        assert!(p.include_stop_str_in_output && p.ignore_eos && !p.skip_special_tokens);
    }

    #[test]
    fn absent_fields_take_the_models_defaults() {
        let defaults = GenerationDefaults { temperature: Some(0.6), top_k: Some(20), top_p: Some(0.95), ..Default::default() };
        let p = build("{}", &defaults).unwrap();
        assert_eq!((p.temperature, p.top_k, p.top_p), (0.6, 20, 0.95));
        assert_eq!(p.max_tokens, 90, "default max_tokens is the rest of the context");
        let p = build(r#"{"temperature": 0}"#, &defaults).unwrap();
        assert_eq!(p.temperature, 0.0, "an explicit value beats the default");
    }

    #[test]
    fn bad_values_name_the_field() {
        let d = GenerationDefaults::default();
        for (json, param) in [
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": -5}"#, "max_tokens"),
            (r#"{"max_completion_tokens": 0}"#, "max_completion_tokens"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"top_p": 1.5}"#, "top_p"),
            (r#"{"top_k": -2}"#, "top_k"),
            (r#"{"n": 0}"#, "n"),
            (r#"{"n": 1000}"#, "n"),
            (r#"{"min_tokens": -1}"#, "min_tokens"),
            (r#"{"stop": [""]}"#, "stop"),
            (r#"{"best_of": 3}"#, "best_of"),
            (r#"{"logit_bias": {"5": 1}}"#, "logit_bias"),
        ] {
            let err = build(json, &d).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{json}: {}", err.message);
            assert_eq!(err.status, 400);
        }
    }

    #[test]
    fn chat_logprobs_rules() {
        assert_eq!(chat_logprobs(None, None).unwrap(), None);
        assert_eq!(chat_logprobs(Some(true), None).unwrap(), Some(0));
        assert_eq!(chat_logprobs(Some(true), Some(3)).unwrap(), Some(3));
        assert_eq!(chat_logprobs(Some(false), Some(3)).unwrap_err().param.as_deref(), Some("top_logprobs"));
        assert_eq!(chat_logprobs(Some(true), Some(99)).unwrap_err().param.as_deref(), Some("top_logprobs"));
    }
}
