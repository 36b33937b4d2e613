//! `mcp-proxy.toml`. Unknown keys are errors; secrets come from `env:NAME` or
//! `file:PATH`.

use lapse_core::TtlDuration;
use lapse_verifier::OnStale;
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The broker's base URL.
    pub broker: String,
    /// The `iss` of Lapse tokens (the broker's `public_url`); default `broker`.
    /// Set it when the proxy reaches the broker by another URL than the one the
    /// broker names itself by (inside a cluster, through a sidecar). README: MCP.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The audience agents' tokens must be for (set it to the proxy's URL for
    /// clients that ask with RFC 8707 `resource`).
    pub audience: String,
    /// The action (scope word) a tool call needs, and Cedar's action for it.
    #[serde(default = "default_action")]
    pub action: String,
    /// The proxy's operator API token: role `gate` (and `signal` for
    /// `on_drift = "revoke"`), bound to `audience`.
    pub token: String,
    /// How long the revocation feed may be silent before calls are refused.
    #[serde(default = "default_staleness")]
    pub staleness: TtlDuration,
    #[serde(default = "default_on_stale")]
    pub on_stale: OnStale,
    /// A call outside the declared intent is refused; `revoke` also ends the whole
    /// task (an `intent-drift` signal).
    #[serde(default)]
    pub on_drift: OnDrift,
    /// How often the broker's policies are checked for changes.
    #[serde(default = "default_policy_refresh")]
    pub policy_refresh: TtlDuration,
    /// Calls whose audit record the broker has not yet taken; past it, calls are
    /// refused (no call without its record for longer than the backlog lasts).
    #[serde(default = "default_max_unreported")]
    pub max_unreported: usize,
    /// The streamable HTTP transport (`lapse mcp-proxy --http`).
    #[serde(default)]
    pub http: Option<HttpConfig>,
    /// The MCP servers behind the proxy; a tool's name must be unique across them.
    #[serde(rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnDrift {
    #[default]
    Refuse,
    Revoke,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// The endpoint's URL as agents address it (DPoP `htu`, RFC 9728 `resource`),
    /// e.g. `https://tools.example.com/mcp`. Its path is where the proxy answers.
    pub url: String,
    #[serde(default)]
    pub tls: Option<lapse_tls::TlsConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// A server over stdio: the program and its arguments.
    #[serde(default)]
    pub command: Vec<String>,
    /// A server over streamable HTTP.
    #[serde(default)]
    pub url: Option<String>,
    /// The proxy's own credential for an HTTP server (`env:` or `file:`), sent as
    /// `Authorization: Bearer …`. The agent's token is never sent upstream.
    #[serde(default)]
    pub credential: Option<String>,
    /// Environment for a stdio server, beyond a minimal `PATH`/`HOME`: the
    /// proxy's own environment (which holds the agent's token) is not inherited.
    /// Values are passed as written, not resolved as `env:`/`file:` references.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

fn default_action() -> String {
    "call".into()
}
fn default_staleness() -> TtlDuration {
    TtlDuration::from_secs(5)
}
fn default_on_stale() -> OnStale {
    OnStale::Deny
}
fn default_policy_refresh() -> TtlDuration {
    TtlDuration::from_secs(2)
}
fn default_max_unreported() -> usize {
    10_000
}

impl ProxyConfig {
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        if cfg.upstreams.is_empty() {
            return Err("at least one `[[upstream]]` is needed".into());
        }
        for u in &cfg.upstreams {
            match (u.command.is_empty(), &u.url) {
                (false, None) | (true, Some(_)) => {}
                _ => {
                    return Err(format!(
                        "upstream `{}`: give exactly one of `command` (stdio) and `url` (HTTP)",
                        u.name
                    ));
                }
            }
            if u.credential.is_some() && u.url.is_none() {
                return Err(format!(
                    "upstream `{}`: `credential` is for HTTP upstreams",
                    u.name
                ));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_are_checked() {
        let ok = r#"
broker = "http://127.0.0.1:7800"
audience = "mcp-tools"
token = "env:T"
[[upstream]]
name = "files"
command = ["python3", "server.py"]
"#;
        let c = ProxyConfig::parse(ok).expect("parses");
        assert_eq!((c.action.as_str(), c.on_drift), ("call", OnDrift::Refuse));
        for bad in [
            ok.replace("command = [\"python3\", \"server.py\"]", ""),
            format!("{ok}url = \"http://x\"\n"),
            format!("{ok}credential = \"env:X\"\n"),
            format!("{ok}colour = 1\n"),
            ok.replace(
                "[[upstream]]\nname = \"files\"\ncommand = [\"python3\", \"server.py\"]\n",
                "",
            ),
        ] {
            assert!(ProxyConfig::parse(&bad).is_err(), "{bad}");
        }
    }
}
