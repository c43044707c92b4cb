//! `stream` and `stream_options`, shared by both generation endpoints.

use crate::openai::usage::StreamOptions;
use crate::openai::ApiError;

/// Whether a final usage chunk was asked for; `stream_options` only goes with a stream.
pub fn include_usage(stream: Option<bool>, options: Option<&StreamOptions>) -> Result<bool, ApiError> {
    match (stream.unwrap_or(false), options) {
        (false, Some(_)) => Err(ApiError::invalid_param("stream_options", "stream_options is only allowed when stream is true")),
        (_, options) => Ok(options.is_some_and(|o| o.include_usage)),
    }
}
