//! `gate.toml`. Unknown keys are errors; secrets come from `env:NAME` or `file:PATH`.

use crate::GateError;
use lapse_core::TtlDuration;
use lapse_verifier::OnStale;
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    pub listen: SocketAddr,
    /// The broker's base URL.
    pub broker: String,
    /// The `iss` of Lapse tokens (the broker's `public_url`); default `broker`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The audience this gate protects: tokens for any other are refused.
    pub audience: String,
    /// The gate's operator API token (role `gate`; `introspect` too when
    /// `on_stale = "introspect"`): `env:NAME` or `file:PATH`.
    pub token: String,
    /// The scheme and host clients address the protected service with, for DPoP
    /// `htu` (e.g. `https://orders.example.com`). Required: taking it from request
    /// headers would let the client choose the URL its proof is checked against.
    pub external_url: String,
    /// Which proxy asks: `nginx` (default; reads `X-Original-Method`,
    /// `X-Original-URI`, `X-Real-IP`, which the nginx config sets), `traefik`
    /// (`X-Forwarded-Method`, `X-Forwarded-Uri`, the last `X-Forwarded-For` hop) or
    /// `envoy` (the method and path of the check request under `/check`, the last
    /// `X-Forwarded-For` hop). Only that proxy's headers are read: a header a
    /// client sent and the proxy passed along must never choose the action.
    #[serde(default)]
    pub proxy: Proxy,
    /// How long the revocation feed may be silent before the gate stops trusting
    /// its view of which grants ended.
    #[serde(default = "default_staleness")]
    pub staleness: TtlDuration,
    /// `deny` (default: fail closed) or `introspect` (ask the broker per request).
    #[serde(default = "default_on_stale")]
    pub on_stale: OnStale,
    /// How often the broker's policies are checked for changes.
    #[serde(default = "default_policy_refresh")]
    pub policy_refresh: TtlDuration,
    /// How often uses are reported to the broker (for `@idle` windows).
    #[serde(default = "default_use_report")]
    pub use_report: TtlDuration,
    /// Method and path to action, first match wins; no match is refused.
    #[serde(rename = "rule")]
    pub rules: Vec<Rule>,
    /// TLS on the gate's own listener. With `client_ca` and
    /// `require_client_cert`, only a proxy holding a certificate from that bundle
    /// can ask the gate anything.
    #[serde(default)]
    pub tls: Option<lapse_tls::TlsConfig>,
}

fn default_staleness() -> TtlDuration {
    TtlDuration::from_secs(5)
}
fn default_on_stale() -> OnStale {
    OnStale::Deny
}
fn default_use_report() -> TtlDuration {
    TtlDuration::from_secs(1)
}
fn default_policy_refresh() -> TtlDuration {
    TtlDuration::from_secs(2)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Proxy {
    #[default]
    Nginx,
    Traefik,
    Envoy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// `GET`, `POST`, … or `*`.
    #[serde(default = "any")]
    pub method: String,
    /// An exact path, `/prefix/*` (the prefix and everything under it), or
    /// `/prefix*` (any path starting so).
    pub path: String,
    pub action: String,
}

fn any() -> String {
    "*".into()
}

impl Rule {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        let method_ok = self.method == "*" || self.method.eq_ignore_ascii_case(method);
        let path_ok = if let Some(prefix) = self.path.strip_suffix("/*") {
            path == prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with('/'))
        } else if let Some(prefix) = self.path.strip_suffix('*') {
            path.starts_with(prefix)
        } else {
            path == self.path
        };
        method_ok && path_ok
    }
}

/// A path the rules can be trusted on: absolute, and without anything that makes
/// a proxy and an upstream disagree on what is addressed — dot segments, empty
/// segments, backslashes, any percent-encoding (`/orders/%61dmin` is
/// `/orders/admin` upstream) and matrix parameters (`;`).
pub fn plain_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..")
        && !path.contains(['%', ';', '\\'])
        && path.bytes().all(|b| b.is_ascii_graphic())
}

impl GateConfig {
    pub fn load(path: &std::path::Path) -> Result<Self, GateError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| GateError::Config(format!("cannot read `{}`: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| GateError::Config(format!("`{}`: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Self = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        if cfg.rules.is_empty() {
            return Err(
                "at least one `[[rule]]` is needed: without one every request is refused".into(),
            );
        }
        for r in &cfg.rules {
            if !r.path.starts_with('/') {
                return Err(format!("rule path `{}` must start with `/`", r.path));
            }
        }
        if cfg.staleness.secs() < 2 {
            return Err(
                "`staleness` must be at least 2s: the feed's heartbeat comes every second".into(),
            );
        }
        if !cfg.external_url.starts_with("https://") && !cfg.external_url.starts_with("http://") {
            return Err("`external_url` must be an http(s) URL".into());
        }
        if !cfg.token.starts_with("env:") && !cfg.token.starts_with("file:") {
            return Err("`token` must be `env:NAME` or `file:PATH`, never the token itself".into());
        }
        Ok(cfg)
    }

    /// The gate's API token, read from where `token` points.
    pub fn token(&self) -> Result<String, GateError> {
        secret("token", &self.token)
    }
}

/// A secret named in config as `env:NAME` or `file:PATH`; `key` names the setting
/// in errors.
pub fn secret(key: &str, spec: &str) -> Result<String, GateError> {
    let t = if let Some(name) = spec.strip_prefix("env:") {
        std::env::var(name)
            .map_err(|_| GateError::Config(format!("`{key}`: ${name} is not set")))?
    } else if let Some(path) = spec.strip_prefix("file:") {
        std::fs::read_to_string(path)
            .map_err(|e| GateError::Config(format!("`{key}`: cannot read `{path}`: {e}")))?
    } else {
        return Err(GateError::Config(format!(
            "`{key}` must be `env:` or `file:`"
        )));
    };
    Ok(t.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(method: &str, path: &str) -> Rule {
        Rule {
            method: method.into(),
            path: path.into(),
            action: "read".into(),
        }
    }

    #[test]
    fn rules_match_exact_prefix_and_method() {
        let r = rule("GET", "/orders/*");
        assert!(r.matches("GET", "/orders"));
        assert!(r.matches("get", "/orders/7"));
        assert!(!r.matches("GET", "/ordersX"));
        assert!(!r.matches("POST", "/orders/7"));
        assert!(rule("*", "/health").matches("DELETE", "/health"));
        assert!(!rule("*", "/health").matches("GET", "/health/x"));
        assert!(rule("GET", "/v1*").matches("GET", "/v12"));
    }

    #[test]
    fn paths_that_proxies_and_upstreams_read_differently_are_refused() {
        assert!(plain_path("/orders/7"));
        for p in [
            "orders",
            "/orders/../admin",
            "/orders/./x",
            "//evil",
            "/orders/%2e%2e/admin",
            "/orders%2Fadmin",
            "/orders/%61dmin/drop",
            "/orders/admin;x/drop",
            "/a\\b",
            "/a b",
        ] {
            assert!(!plain_path(p), "{p}");
        }
    }
}
