//! A dependent's confirmation (dual keys, docs/lifecycle.md "Two live keys"): `GET confirm.url`
//! answers JSON holding, at `fingerprint_pointer`, the fingerprint of the key the dependent uses now.
//! It is the one dependent answer keyrotd reads a body of: at most [`MAX_CONFIRM_BODY`] bytes, and
//! only the fingerprint is kept (never quoted in an error: a misconfigured dependent might answer
//! with its key).

use serde_json::Value;

use super::Notifier;
use crate::config::ConfirmConfig;

/// The largest confirm answer read; a fingerprint answer is a few dozen bytes.
pub const MAX_CONFIRM_BODY: usize = 64 * 1024;

impl Notifier {
    /// The fingerprint the dependent reports, `Ok(None)` when it reports none (no key yet), or why it
    /// could not be read.
    pub async fn confirm(&self, confirm: &ConfirmConfig) -> Result<Option<String>, String> {
        let resp = self
            .http
            .get(confirm.url.clone())
            .timeout(confirm.timeout)
            .send()
            .await
            .map_err(|e| format!("confirm request failed: {}", short(&e)))?;
        let status = resp.status().as_u16();
        if !resp.status().is_success() {
            return Err(format!("confirm answered HTTP {status}"));
        }
        let body = crate::provider::http::wire::read_capped(resp, MAX_CONFIRM_BODY)
            .await
            .map_err(|e| format!("confirm answer: {e}"))?;
        parse_fingerprint(&body, &confirm.fingerprint_pointer)
    }
}

fn short(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "connection failed"
    }
}

/// The fingerprint at `pointer`: a string of hex digits, or null/absent for "no key". Anything else
/// is an error that names the pointer, never the value.
pub fn parse_fingerprint(body: &[u8], pointer: &str) -> Result<Option<String>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| "confirm answer is not JSON".to_string())?;
    match value.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit()) => {
            Ok(Some(s.to_ascii_lowercase()))
        }
        Some(_) => Err(format!(
            "confirm answer has no fingerprint (hex digits) at {pointer}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_hex_digits_and_anything_else_is_not_quoted() {
        assert_eq!(
            parse_fingerprint(br#"{"key": {"fp": "0123456789AB"}}"#, "/key/fp"),
            Ok(Some("0123456789ab".into()))
        );
        assert_eq!(parse_fingerprint(br#"{"fp": null}"#, "/fp"), Ok(None));
        let e = parse_fingerprint(br#"{"fp": "sk_live_oops"}"#, "/fp").unwrap_err();
        assert!(!e.contains("sk_live_oops") && e.contains("/fp"), "{e}");
        assert!(parse_fingerprint(b"<html>", "/fp").is_err());
    }
}
