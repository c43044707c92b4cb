//! The `kv_transfer_params` request field: absent, a prefill order, or a decode order.

use serde_json::Value;

use super::descriptor::MigrationDescriptor;
use crate::openai::ApiError;

const FIELD: &str = "kv_transfer_params";

#[derive(Debug)]
pub enum KvParams {
    /// An ordinary request.
    None,
    /// `{"do_remote_decode": true}`: compute the prompt, hand its KV off. With
    /// `"early_descriptor": true` the answer is two JSON lines: the descriptor as soon as
    /// the prompt's last forward is under way, then the answer.
    RemoteDecode { early: bool },
    /// A prefill engine's descriptor: continue from its KV.
    Continue(Box<MigrationDescriptor>),
}

impl KvParams {
    /// Reads the field from the raw request body (the typed request ignores it).
    pub fn from_body(body: &[u8]) -> Result<KvParams, ApiError> {
        let Ok(Value::Object(mut object)) = serde_json::from_slice::<Value>(body) else { return Ok(KvParams::None) };
        match object.remove(FIELD) {
            None | Some(Value::Null) => Ok(KvParams::None),
            Some(Value::Object(params)) if params.get("do_remote_decode") == Some(&Value::Bool(true)) => {
                let early = match params.get("early_descriptor") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(early)) => *early,
                    Some(_) => return Err(ApiError::invalid_param(format!("{FIELD}.early_descriptor"), "must be a boolean")),
                };
                Ok(KvParams::RemoteDecode { early })
            }
            Some(value @ Value::Object(_)) => serde_json::from_value(value)
                .map(|d| KvParams::Continue(Box::new(d)))
                .map_err(|e| ApiError::invalid_param(FIELD, format!("not a migration descriptor from a prefill engine: {e}"))),
            Some(_) => Err(ApiError::invalid_param(FIELD, "must be an object")),
        }
    }

    /// Prefill answers once, whole: a stream could not carry the descriptor.
    pub fn check_stream(&self, stream: bool) -> Result<(), ApiError> {
        if matches!(self, KvParams::RemoteDecode { .. }) && stream {
            return Err(ApiError::invalid_param("stream", "must be false with kv_transfer_params.do_remote_decode"));
        }
        Ok(())
    }

    /// For a prefill order: what its answer needs.
    pub fn prefill_order(&self, prompt: &[u32]) -> Option<super::PrefillOrder> {
        match self {
            KvParams::RemoteDecode { early } => Some(super::PrefillOrder { prompt: prompt.to_vec(), early: *early }),
            _ => None,
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, KvParams::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_and_the_errors() {
        assert!(matches!(KvParams::from_body(br#"{"prompt":"x"}"#), Ok(KvParams::None)));
        assert!(matches!(KvParams::from_body(br#"{"kv_transfer_params":null}"#), Ok(KvParams::None)));
        assert!(matches!(
            KvParams::from_body(br#"{"kv_transfer_params":{"do_remote_decode":true}}"#),
            Ok(KvParams::RemoteDecode { early: false })
        ));
        let early = br#"{"kv_transfer_params":{"do_remote_decode":true,"early_descriptor":true}}"#;
        assert!(matches!(KvParams::from_body(early), Ok(KvParams::RemoteDecode { early: true })));
        let err = KvParams::from_body(br#"{"kv_transfer_params":{"do_remote_decode":true,"early_descriptor":1}}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("kv_transfer_params.early_descriptor"), "{}", err.message);
        let err = KvParams::from_body(br#"{"kv_transfer_params":{"lease_id":"1"}}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some(FIELD));
        assert!(KvParams::from_body(br#"{"kv_transfer_params":3}"#).is_err());
        assert!(KvParams::RemoteDecode { early: true }.check_stream(true).is_err());
        assert!(KvParams::RemoteDecode { early: false }.check_stream(false).is_ok());
    }
}
