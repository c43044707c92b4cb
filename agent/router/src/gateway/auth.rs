//! API keys: `Authorization: Bearer KEY` must name one of the configured keys.

use axum::http::{header, HeaderMap};

use crate::api_error::ApiError;

#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl ApiKeys {
    pub fn new(keys: &[String]) -> ApiKeys {
        ApiKeys { keys: keys.iter().map(|k| k.as_bytes().to_vec()).collect() }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The accepted key (it names the client for rate limiting), or 401. With no keys
    /// configured every request is accepted and `None` is returned.
    pub fn check<'h>(&self, headers: &'h HeaderMap) -> Result<Option<&'h str>, ApiError> {
        if !self.enabled() {
            return Ok(None);
        }
        let presented = bearer_token(headers).ok_or_else(ApiError::unauthorized)?;
        // Compare against every key in constant time so timing reveals nothing of them.
        let matched = self.keys.iter().fold(false, |found, key| found | constant_time_eq(key, presented.as_bytes()));
        if matched {
            Ok(Some(presented))
        } else {
            Err(ApiError::unauthorized())
        }
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_configured_keys_pass() {
        let keys = ApiKeys::new(&["k1".into(), "k2".into()]);
        assert_eq!(keys.check(&headers(Some("Bearer k2"))).unwrap(), Some("k2"));
        assert_eq!(keys.check(&headers(Some("bearer k1"))).unwrap(), Some("k1"));
        for bad in [None, Some("Bearer nope"), Some("Basic k1"), Some("Bearer "), Some("k1")] {
            assert_eq!(keys.check(&headers(bad)).unwrap_err().status, 401, "{bad:?}");
        }
    }

    #[test]
    fn no_keys_means_open() {
        assert_eq!(ApiKeys::default().check(&headers(None)).unwrap(), None);
    }
}
