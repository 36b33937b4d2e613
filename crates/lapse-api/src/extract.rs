//! Reading a request: its body within the size limit, a form or JSON body of the
//! declared media type, and the headers that carry credentials.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use lapse_broker::BrokerError;
use lapse_broker::error::clip;
use std::collections::HashMap;

/// The largest request body any endpoint reads.
pub const MAX_BODY: usize = 64 * 1024;

pub(crate) fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("request body exceeds {} KiB", MAX_BODY / 1024))
        } else {
            BrokerError::InvalidRequest(format!("cannot read body: {e}")).into()
        }
    })
}

/// Parses a form body; each parameter at most once (RFC 6749 section 3.2).
pub(crate) fn form(headers: &HeaderMap, b: &[u8]) -> Result<HashMap<String, String>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.split(';').next().is_some_and(|m| {
        m.trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    }) {
        return Err(ApiError::UnsupportedMediaType(
            "expected `application/x-www-form-urlencoded`".into(),
        ));
    }
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(b) {
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(BrokerError::InvalidRequest(format!(
                "parameter `{}` is repeated",
                clip(&k)
            ))
            .into());
        }
    }
    Ok(out)
}

pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    b: &[u8],
) -> Result<T, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(ApiError::UnsupportedMediaType(
            "expected `application/json`".into(),
        ));
    }
    Ok(serde_json::from_slice(b)
        .map_err(|e| BrokerError::InvalidRequest(format!("invalid JSON body: {e}")))?)
}

pub(crate) fn dpop_headers(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all("dpop")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect()
}

pub(crate) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// A JSON body that may be left out (then every field takes its default).
pub(crate) fn optional_json<T: Default + serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    b: &[u8],
) -> Result<T, ApiError> {
    if b.is_empty() {
        Ok(T::default())
    } else {
        json_body(headers, b)
    }
}
