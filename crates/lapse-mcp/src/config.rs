//! `mcp-proxy.toml`. Unknown keys are errors; secrets come from `env:NAME` or
//! `file:PATH` (the operator token also from `stdin`, see [`TokenSource`]).

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
    /// `on_drift = "revoke"`), bound to `audience`. Where it comes from:
    /// [`TokenSource`].
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

/// Where the proxy's operator token comes from (`token`). It writes audit records,
/// so it must never be in the agent's hands: see THREATS.md T68.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource<'a> {
    /// `env:NAME`: the proxy's environment.
    Env(&'a str),
    /// `file:PATH`.
    File(&'a str),
    /// `stdin`: the first line of standard input, written by a supervisor (`lapse
    /// run --mcp-proxy`) through a pipe; HTTP only (over stdio, standard input is
    /// the agent's). The proxy stops when that input ends.
    Stdin,
}

impl<'a> TokenSource<'a> {
    pub fn parse(spec: &'a str) -> Result<Self, String> {
        if let Some(name) = spec.strip_prefix("env:") {
            Ok(Self::Env(name))
        } else if let Some(path) = spec.strip_prefix("file:") {
            Ok(Self::File(path))
        } else if spec == "stdin" {
            Ok(Self::Stdin)
        } else {
            Err(format!(
                "`token` must be `env:NAME`, `file:PATH` or `stdin`, not `{spec}`"
            ))
        }
    }
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
        TokenSource::parse(&cfg.token)?;
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

    /// Serves HTTP at `addr` instead of `[http] listen` (`lapse mcp-proxy
    /// --listen`): the endpoint keeps `[http] url`'s path (`/mcp` without
    /// `[http]`) and TLS, its URL names `addr`.
    pub fn listen_at(&mut self, addr: SocketAddr) {
        let old = self.http.take();
        let path = old
            .as_ref()
            .and_then(|h| url::Url::parse(&h.url).ok())
            .map_or_else(|| "/mcp".to_owned(), |u| u.path().to_owned());
        let tls = old.and_then(|h| h.tls);
        let scheme = if tls.is_some() { "https" } else { "http" };
        self.http = Some(HttpConfig {
            listen: addr,
            url: format!("{scheme}://{addr}{path}"),
            tls,
        });
    }

    /// Where the operator token comes from.
    pub fn token_source(&self) -> Result<TokenSource<'_>, String> {
        TokenSource::parse(&self.token)
    }

    /// The operator token from `env:` or `file:`; `stdin` is read by the caller
    /// (see [`crate::Proxy::with_token`]).
    pub fn operator_token(&self) -> Result<String, String> {
        match self.token_source()? {
            TokenSource::Stdin => {
                Err("`token = \"stdin\"`: the token is read from standard input (HTTP only)".into())
            }
            _ => lapse_gate::config::secret("token", &self.token).map_err(|e| e.to_string()),
        }
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
        assert_eq!(c.token_source(), Ok(TokenSource::Env("T")));
        let c = ProxyConfig::parse(&ok.replace("env:T", "stdin")).expect("parses");
        assert_eq!(c.token_source(), Ok(TokenSource::Stdin));
        assert!(
            c.operator_token().is_err(),
            "the caller reads standard input"
        );
        let mut c = c;
        let at: SocketAddr = "127.0.0.1:40123".parse().expect("address");
        c.listen_at(at);
        let h = c.http.as_ref().expect("an [http] listener");
        assert_eq!(
            (h.listen, h.url.as_str()),
            (at, "http://127.0.0.1:40123/mcp")
        );
        let mut c = ProxyConfig::parse(&format!(
            "{ok}[http]\nlisten = \"0.0.0.0:7801\"\nurl = \"https://tools.example.com/v1/mcp\"\n"
        ))
        .expect("parses");
        c.listen_at(at);
        let h = c.http.as_ref().expect("an [http] listener");
        assert_eq!(
            h.url, "http://127.0.0.1:40123/v1/mcp",
            "path kept, address replaced"
        );
        for bad in [
            ok.replace("command = [\"python3\", \"server.py\"]", ""),
            format!("{ok}url = \"http://x\"\n"),
            format!("{ok}credential = \"env:X\"\n"),
            format!("{ok}colour = 1\n"),
            ok.replace("env:T", "T"),
            ok.replace(
                "[[upstream]]\nname = \"files\"\ncommand = [\"python3\", \"server.py\"]\n",
                "",
            ),
        ] {
            assert!(ProxyConfig::parse(&bad).is_err(), "{bad}");
        }
    }
}
