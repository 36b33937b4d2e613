//! The token exchange: what a workload asks for, and asking for it (waiting for
//! approval when told to).

use crate::client::error_fail;
use crate::exit::{Fail, fail};
use crate::wait;
use lapse_core::{Clock, SystemClock, TtlDuration};
use lapse_token::DpopKey;
use serde_json::{Value, json};

/// What is asked for: the same for `lapse request` and `lapse run`.
#[derive(clap::Args, Debug)]
pub(crate) struct AccessArgs {
    #[arg(long)]
    audience: String,
    /// Space-separated actions.
    #[arg(long)]
    scope: String,
    #[arg(long)]
    task: String,
    #[arg(long)]
    purpose: String,
    #[arg(long)]
    ticket: Option<String>,
    #[arg(long)]
    environment: Option<String>,
    #[arg(long)]
    pub(crate) ttl: Option<TtlDuration>,
    /// The tools an agent's task declares (JSON, as the `tools` of a token
    /// exchange): all an MCP proxy will let it call.
    #[arg(long, value_name = "JSON")]
    tools: Option<String>,
    /// Break glass: decided by `@break_glass` policies only, issued at once with a
    /// hard short lifetime, announced, and reviewed afterwards. Needs --justification.
    #[arg(long, requires = "justification")]
    break_glass: bool,
    /// Why, in words a reviewer will read (break-glass only).
    #[arg(long, requires = "break_glass")]
    justification: Option<String>,
}

impl AccessArgs {
    /// The RFC 8693 token-exchange form for `identity`.
    pub(crate) fn exchange_form(&self, identity: String) -> Vec<(&'static str, String)> {
        let mut form = vec![
            ("grant_type", lapse_api::http::TOKEN_EXCHANGE.to_owned()),
            ("subject_token", identity),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:jwt".to_owned(),
            ),
            ("audience", self.audience.clone()),
            ("scope", self.scope.clone()),
            ("task", self.task.clone()),
            ("purpose", self.purpose.clone()),
        ];
        if let Some(t) = &self.ticket {
            form.push(("ticket", t.clone()));
        }
        if let Some(e) = &self.environment {
            form.push(("environment", e.clone()));
        }
        if let Some(t) = self.ttl {
            form.push(("expires_in", t.secs().to_string()));
        }
        if let Some(t) = &self.tools {
            form.push(("tools", t.clone()));
        }
        if self.break_glass {
            form.push(("break_glass", "true".to_owned()));
            form.push((
                "justification",
                self.justification.clone().unwrap_or_default(),
            ));
        }
        form
    }

    pub(crate) fn describe(&self) -> String {
        format!("`{}` [{}]", self.audience, self.scope)
    }
}

/// The token exchange, waiting for approval when `wait` is given. An error comes
/// with the answer's body, so callers can say more about a pending request.
pub(crate) async fn exchange(
    http: &reqwest::Client,
    base: &str,
    key: &DpopKey,
    form: &[(&'static str, String)],
    wait: Option<TtlDuration>,
) -> Result<Value, (Fail, Value)> {
    let url = format!("{base}/oauth/token");
    let proof = key.proof("POST", &url, None, SystemClock.now().unix_seconds());
    let resp = http
        .post(&url)
        .header("DPoP", proof)
        .form(form)
        .send()
        .await
        .map_err(|e| (fail(7, format!("cannot reach Lapse: {e}")), Value::Null))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(json!({}));
    match (status.is_success(), wait) {
        (true, _) => Ok(body),
        (false, Some(w)) if body["error"] == "authorization_pending" => wait::wait_for_approval(
            http,
            base,
            key,
            &body,
            std::time::Duration::from_secs(w.secs()),
        )
        .await
        .map_err(|f| (f, Value::Null)),
        (false, _) => Err((error_fail(status.as_u16(), &body), body)),
    }
}
