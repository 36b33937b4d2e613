//! Talking to the broker: its URL and operator token, the HTTP client, and
//! answers turned into exit codes.

use crate::exit::{Fail, fail};
use crate::local::DEFAULT_DEV_DIR;
use lapse_server::dev;
use serde_json::{Value, json};
use std::path::Path;

#[derive(clap::Args)]
pub(crate) struct Server {
    /// Broker URL.
    #[arg(long, env = "LAPSE_URL", default_value = "http://127.0.0.1:7800")]
    pub(crate) url: String,
    /// Operator API token (defaults to the dev folder's admin token when present).
    #[arg(long, env = "LAPSE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

pub(crate) fn client() -> reqwest::Client {
    lapse_identity::http_client()
}

pub(crate) fn operator_token(s: &Server) -> Result<String, Fail> {
    if let Some(t) = &s.token {
        return Ok(t.clone());
    }
    std::fs::read_to_string(Path::new(DEFAULT_DEV_DIR).join(dev::ADMIN_TOKEN_FILE))
        .map(|t| t.trim().to_owned())
        .map_err(|_| fail(2, "an operator token is required: --token or LAPSE_TOKEN"))
}

/// Reads an answer; maps error codes to exit codes.
pub(crate) async fn answer(resp: Result<reqwest::Response, reqwest::Error>) -> Result<Value, Fail> {
    let resp = resp.map_err(|e| fail(7, format!("cannot reach Lapse: {e}")))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(json!({}));
    if status.is_success() {
        return Ok(body);
    }
    Err(error_fail(status.as_u16(), &body))
}

/// An error answer as an exit code and a message.
pub(crate) fn error_fail(status: u16, body: &Value) -> Fail {
    let code = body["error"].as_str().unwrap_or("error");
    let desc = body["error_description"].as_str().unwrap_or("");
    let exit = match (status, code) {
        (_, "access_denied") => 3,
        (_, "authorization_pending") => 4,
        (503, _) => 7,
        _ => 1,
    };
    let mut msg = format!("{code}: {desc}");
    if let Some(r) = body["request_id"].as_str() {
        msg.push_str(&format!(" (request_id {r})"));
    }
    fail(exit, msg)
}
