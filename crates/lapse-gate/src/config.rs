//! `gate.toml`. Unknown keys are errors; secrets come from `env:NAME` or `file:PATH`.

use crate::error::GateError;
use lapse_core::TtlDuration;
use lapse_verifier::OnStale;
use serde::Deserialize;
use std::borrow::Cow;
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
    /// How old a DPoP proof may be (its `iat`), between [`DPOP_MAX_AGE_MIN`] and
    /// [`DPOP_MAX_AGE_MAX`]; default 60 s. Each gate remembers the proofs it
    /// accepted for this long, so a proof replayed to another replica of the gate
    /// within it is accepted there once (THREATS.md): shorter narrows that window,
    /// but refuses clients whose clocks are further behind.
    #[serde(default = "default_dpop_max_age")]
    pub dpop_max_age: TtlDuration,
    /// Match rules on paths whose percent-encoded *unreserved* characters
    /// (RFC 3986 section 2.3: letters, digits, `-`, `.`, `_`, `~`) are decoded, so
    /// `/orders/%7Ealice` matches as `/orders/~alice`. Off by default: any
    /// percent-encoding is refused. Any other encoding (`%2F`, `%25`, `%3B`, …) is
    /// refused either way, and a decoded path is checked like any other (a `%2E%2E`
    /// segment is a `..` segment).
    #[serde(default)]
    pub decode_unreserved: bool,
    /// Require RFC 9449 server nonces: a proof must carry a nonce this gate process
    /// issued (sent in `DPoP-Nonce` on every answer; a proof without one, or with
    /// another gate's, is refused `use_dpop_nonce` with a fresh one). A proof
    /// captured on its way to one replica is then refused by every other. Clients
    /// that speak RFC 9449 retry by themselves; behind nginx the example passes
    /// the header through.
    #[serde(default)]
    pub dpop_nonce: bool,
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
fn default_dpop_max_age() -> TtlDuration {
    TtlDuration::from_secs(60)
}

/// The shortest `dpop_max_age`: the verifier allows proofs 5 s from the future
/// (clock skew); a window shorter than that refuses honest clients.
pub const DPOP_MAX_AGE_MIN: TtlDuration = TtlDuration::from_secs(5);
/// The longest `dpop_max_age`: a proof is replayable to other replicas for this
/// long, and every replica remembers each accepted proof for as long.
pub const DPOP_MAX_AGE_MAX: TtlDuration = TtlDuration::from_secs(300);

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

/// Why the gate will not match rules on a path: each is a way a proxy and an
/// upstream could disagree on what is addressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathFault {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("the path holds a byte that is not visible ASCII")]
    NotVisible,
    #[error("the path holds `{0}`, which proxies and services read differently")]
    Ambiguous(char),
    #[error(
        "the path holds an empty segment (`//`), which proxies and services resolve differently"
    )]
    EmptySegment,
    #[error(
        "the path holds a dot segment (`.` or `..`), which proxies and services resolve differently"
    )]
    DotSegment,
    #[error(
        "the path is percent-encoded (`{0}`) and this gate matches rules on unencoded paths only (`decode_unreserved` lets it decode letters, digits and `-._~`)"
    )]
    Encoded(String),
    #[error(
        "the path holds `{0}`, an encoding the gate never decodes (only letters, digits and `-._~` are, with `decode_unreserved`)"
    )]
    EncodedReserved(String),
    #[error("the path holds `{0}`, which is not a percent-encoding (`%` and two hex digits)")]
    BadEncoding(String),
}

/// The path rules are matched on, or why there is none: absolute, visible ASCII,
/// without anything that makes a proxy and an upstream disagree on what is
/// addressed — dot segments, empty segments, backslashes, matrix parameters (`;`)
/// and percent-encoding (`/orders/%61dmin` is `/orders/admin` upstream). With
/// `decode_unreserved`, encoded unreserved characters (RFC 3986 section 2.3) are
/// decoded first, which every upstream reads the same way (section 6.2.2.2), and
/// the decoded path is checked as any other; `%2F` and every other encoding stay
/// refused.
pub fn rule_path(path: &str, decode_unreserved: bool) -> Result<Cow<'_, str>, PathFault> {
    if !path.starts_with('/') {
        return Err(PathFault::NotAbsolute);
    }
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PathFault::NotVisible);
    }
    if let Some(c) = path.chars().find(|c| matches!(c, ';' | '\\')) {
        return Err(PathFault::Ambiguous(c));
    }
    let path = match path.find('%') {
        None => Cow::Borrowed(path),
        Some(at) if !decode_unreserved => {
            let escape: String = path.get(at..).unwrap_or_default().chars().take(3).collect();
            return Err(PathFault::Encoded(escape));
        }
        Some(_) => Cow::Owned(decode_unreserved_escapes(path)?),
    };
    if path.contains("//") {
        return Err(PathFault::EmptySegment);
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(PathFault::DotSegment);
    }
    Ok(path)
}

/// `path` with every `%XX` of an unreserved character decoded; any other escape
/// refused. `path` is visible ASCII.
fn decode_unreserved_escapes(path: &str) -> Result<String, PathFault> {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(rest.get(..at).unwrap_or_default());
        let escape = rest
            .get(at..at + 3)
            .unwrap_or_else(|| rest.get(at..).unwrap_or_default());
        let decoded = escape
            .strip_prefix('%')
            .filter(|hex| hex.len() == 2 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .ok_or_else(|| PathFault::BadEncoding(escape.to_owned()))?;
        if !(decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'.' | b'_' | b'~')) {
            return Err(PathFault::EncodedReserved(escape.to_owned()));
        }
        out.push(char::from(decoded));
        rest = rest.get(at + escape.len()..).unwrap_or_default();
    }
    out.push_str(rest);
    Ok(out)
}

/// A path the rules can be trusted on as it is ([`rule_path`] without decoding).
pub fn plain_path(path: &str) -> bool {
    rule_path(path, false).is_ok()
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
        if cfg.dpop_max_age < DPOP_MAX_AGE_MIN || cfg.dpop_max_age > DPOP_MAX_AGE_MAX {
            return Err(format!(
                "`dpop_max_age` must be between {}s and {}s: shorter refuses clients within the allowed clock skew, longer widens the window a proof can be replayed to another gate in",
                DPOP_MAX_AGE_MIN.secs(),
                DPOP_MAX_AGE_MAX.secs()
            ));
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

    #[test]
    fn unreserved_escapes_decode_only_when_asked_and_nothing_else_does() {
        let decoded = |p| rule_path(p, true).map(Cow::into_owned);
        assert_eq!(decoded("/orders/%7Ealice"), Ok("/orders/~alice".into()));
        assert_eq!(decoded("/orders/%61dmin"), Ok("/orders/admin".into()));
        assert_eq!(decoded("/a%2d%2E%5f%7e%30"), Ok("/a-._~0".into()));
        assert_eq!(
            rule_path("/orders/%7Ealice", false),
            Err(PathFault::Encoded("%7E".into()))
        );
        for (p, fault) in [
            ("/orders%2Fadmin", PathFault::EncodedReserved("%2F".into())),
            ("/orders/%2f", PathFault::EncodedReserved("%2f".into())),
            ("/orders/%252F", PathFault::EncodedReserved("%25".into())),
            ("/orders/%3Bx", PathFault::EncodedReserved("%3B".into())),
            ("/orders/%20", PathFault::EncodedReserved("%20".into())),
            ("/orders/%C3%A9", PathFault::EncodedReserved("%C3".into())),
            ("/orders/%zz", PathFault::BadEncoding("%zz".into())),
            ("/orders/%4", PathFault::BadEncoding("%4".into())),
            ("/orders/%", PathFault::BadEncoding("%".into())),
            // Decoded dot segments are dot segments.
            ("/orders/%2e%2e/admin", PathFault::DotSegment),
            ("/orders/%2E/x", PathFault::DotSegment),
            ("/orders/a;b", PathFault::Ambiguous(';')),
        ] {
            assert_eq!(rule_path(p, true), Err(fault), "{p}");
        }
    }
}
