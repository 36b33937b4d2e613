//! Waiting for people: poll the token endpoint with the request id (and the same
//! DPoP key) until the request is approved, denied, expires, or `--wait` runs out.
//! On a terminal a live line says who must approve and for how long it has waited;
//! otherwise (CI logs) a plain line now and then.

use crate::client::error_fail;
use crate::exit::{Fail, fail};
use lapse_core::{Clock, SystemClock};
use lapse_token::DpopKey;
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::time::Duration;
use tokio::time::Instant;

const SPINNER: &[char] = &['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
/// Without a terminal, one line this often.
const PLAIN_EVERY: Duration = Duration::from_secs(15);
/// How often the outcome is asked for: an approval reaches the waiting command
/// within this (plus one round trip), well inside a second.
pub const POLL_EVERY: Duration = Duration::from_millis(500);

fn waiting_for(body: &Value) -> String {
    let n = body["approvals_required"].as_u64().unwrap_or(1);
    match body["approvers"].as_str() {
        Some(g) => format!("{n} approval(s) from `{g}`"),
        None => format!("{n} approval(s)"),
    }
}

/// Polls until the request in `pending` (an `authorization_pending` answer) is
/// decided. Returns the token answer; a denial or expiry exits 3, running out of
/// `wait` exits 4.
pub async fn wait_for_approval(
    http: &reqwest::Client,
    base: &str,
    key: &DpopKey,
    pending: &Value,
    wait: Duration,
) -> Result<Value, Fail> {
    let id = pending["request_id"]
        .as_str()
        .ok_or_else(|| fail(1, "the pending answer has no request_id"))?
        .to_owned();
    let url = format!("{base}/oauth/token");
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let mut last = pending.clone();
    let mut next_plain = start;
    let mut tick = 0usize;
    let mut next_poll = start + POLL_EVERY;
    loop {
        let now = Instant::now();
        let waited = now.duration_since(start).as_secs();
        if tty {
            let spin = SPINNER.get(tick % SPINNER.len()).copied().unwrap_or('*');
            eprint!(
                "\r\x1b[2K{spin} waiting for {} (request {id}) {waited}s of {}s",
                waiting_for(&last),
                wait.as_secs()
            );
            let _ = std::io::stderr().flush();
        } else if now >= next_plain {
            eprintln!(
                "lapse: waiting for {} (request {id}), {waited}s of {}s",
                waiting_for(&last),
                wait.as_secs()
            );
            next_plain = now + PLAIN_EVERY;
        }
        if now.duration_since(start) >= wait {
            if tty {
                eprintln!();
            }
            return Err(fail(
                4,
                format!(
                    "no decision within {}s: request {id} still needs {}; it stays approvable for a while, run again with a longer --wait",
                    wait.as_secs(),
                    waiting_for(&last)
                ),
            ));
        }
        if now >= next_poll {
            next_poll = now + POLL_EVERY;
            let proof = key.proof("POST", &url, None, SystemClock.now().unix_seconds());
            let resp = http
                .post(&url)
                .header("DPoP", proof)
                .form(&[
                    ("grant_type", lapse_api::http::TOKEN_EXCHANGE),
                    ("request_id", id.as_str()),
                ])
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            // The broker being briefly unreachable is not a decision: keep waiting.
            if let Ok(r) = resp {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if status.is_success() {
                    if tty {
                        eprintln!("\r\x1b[2K✓ approved after {waited}s");
                    } else {
                        eprintln!("lapse: approved after {waited}s");
                    }
                    return Ok(body);
                }
                if body["error"] == "authorization_pending" {
                    last = body;
                } else {
                    if tty {
                        eprintln!();
                    }
                    return Err(error_fail(status.as_u16(), &body));
                }
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(if tty { 120 } else { 100 })).await;
    }
}
