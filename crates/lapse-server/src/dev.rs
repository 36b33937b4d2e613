//! `lapse serve --dev`: everything a first run needs, in one local folder.
//!
//! The folder holds the server signing key, a dev identity issuer (its private key
//! and JWKS), a copy of the example policies, an operator API token and the
//! `lapse.toml` that ties them together. Existing files are reused, so grants
//! and keys survive restarts.

use crate::StartError;
use lapse_broker::config::Config;
use lapse_broker::json::set_field;
use lapse_token::SigningKey;
use lapse_token::signing::write_private;
use std::path::{Path, PathBuf};

pub const DEV_ISSUER: &str = "https://dev-issuer.lapse.local";
pub const DEV_AUDIENCE: &str = "lapse";
pub const DEV_ISSUER_KEY: &str = "dev-issuer.pem";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const APPROVER_TOKEN_FILE: &str = "approver.token";

/// The operator token stored at `path`, created (0600) when missing.
fn operator_token(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        _ => {
            let raw: [u8; 32] = rand::random();
            let t = format!("lapse_op_{}", lapse_token::b64::encode(raw));
            write_private(path, t.as_bytes())?;
            Ok(t)
        }
    }
}

const EXAMPLES: &[(&str, &str)] = &[
    (
        "actions.cedarschema",
        include_str!("../../../examples/policies/actions.cedarschema"),
    ),
    (
        "ci.cedar",
        include_str!("../../../examples/policies/ci.cedar"),
    ),
    (
        "agents.cedar",
        include_str!("../../../examples/policies/agents.cedar"),
    ),
    (
        "guardrails.cedar",
        include_str!("../../../examples/policies/guardrails.cedar"),
    ),
    (
        "policy-tests.toml",
        include_str!("../../../examples/policies/policy-tests.toml"),
    ),
];

/// Prepares `dir` and returns the config to serve with, and the admin token.
pub fn prepare(
    dir: &Path,
    listen: std::net::SocketAddr,
) -> Result<(Config, PathBuf, String), StartError> {
    let err = |e: std::io::Error| StartError::Dev(format!("`{}`: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(err)?;
    let dir = dir.canonicalize().map_err(err)?;
    let policies = dir.join("policies");
    if !policies.exists() {
        std::fs::create_dir_all(&policies).map_err(err)?;
        for (name, text) in EXAMPLES {
            std::fs::write(policies.join(name), text).map_err(err)?;
        }
    }
    let (issuer_key, _) = SigningKey::load_or_generate(&dir.join(DEV_ISSUER_KEY))?;
    let jwks = serde_json::json!({ "keys": [issuer_key.jwk()] });
    std::fs::write(dir.join("dev-issuer.jwks.json"), jwks.to_string()).map_err(err)?;
    let token = operator_token(&dir.join(ADMIN_TOKEN_FILE)).map_err(err)?;
    let approver = operator_token(&dir.join(APPROVER_TOKEN_FILE)).map_err(err)?;
    let approver_hash = hex::encode(lapse_broker::broker::hash_secret(&approver));
    let hash = hex::encode(lapse_broker::broker::hash_secret(&token));
    let toml = format!(
        r#"# Written by `lapse serve --dev`. Serve it again with `lapse serve --config {cfg}`.
listen = "{listen}"
store = "sqlite://{db}"
policies = "{pol}"
signing_key = "{key}"
max_ttl = "15m"
default_ttl = "5m"
max_lifetime = "1h"

[[issuer]]
issuer = "{DEV_ISSUER}"
jwks = "file://{jwks}"
audience = "{DEV_AUDIENCE}"
workload = "{{sub}}"

[[audience]]
id = "orders-db"
description = "the orders database"

[[audience]]
id = "tickets-api"
description = "the support ticket API"

[[audience]]
id = "mcp-tools"
description = "MCP tools behind `lapse mcp-proxy`"

# Two approvers of the `dba` group, so requests that need two approvals can be
# tried in dev: `lapse approvals approve ID` as each (--token, or LAPSE_TOKEN).
[[operator]]
name = "dev-admin"
token_sha256 = "{hash}"
roles = ["admin", "approve"]
groups = ["dba"]

[[operator]]
name = "dev-approver"
token_sha256 = "{approver_hash}"
roles = ["approve", "read"]
groups = ["dba"]
"#,
        cfg = dir.join("lapse.toml").display(),
        db = dir.join("lapse.db").display(),
        pol = policies.display(),
        key = dir.join("signing.pem").display(),
        jwks = dir.join("dev-issuer.jwks.json").display(),
    );
    let cfg_path = dir.join("lapse.toml");
    std::fs::write(&cfg_path, &toml).map_err(err)?;
    let cfg = Config::parse(&toml).map_err(StartError::Dev)?;
    Ok((cfg, cfg_path, token))
}

/// Mints an identity token from the dev issuer in `dir` (`lapse dev token`).
pub fn dev_token(
    dir: &Path,
    workload: &str,
    ttl_secs: u64,
    extra: &[(String, String)],
    now_secs: i64,
) -> Result<String, String> {
    let key_path = dir.join(DEV_ISSUER_KEY);
    if !key_path.exists() {
        return Err(format!(
            "no dev issuer in `{}`: start `lapse serve --dev` first (dev tokens exist in dev mode only)",
            dir.display()
        ));
    }
    let key = SigningKey::load(&key_path).map_err(|e| e.to_string())?;
    let jti: [u8; 12] = rand::random();
    let mut claims = serde_json::json!({
        "iss": DEV_ISSUER,
        "sub": workload,
        "aud": DEV_AUDIENCE,
        "iat": now_secs,
        "nbf": now_secs,
        "exp": now_secs + i64::try_from(ttl_secs).unwrap_or(600),
        "jti": lapse_token::b64::encode(jti),
    });
    for (k, v) in extra {
        if ["iss", "sub", "aud", "iat", "nbf", "exp", "jti"].contains(&k.as_str()) {
            return Err(format!("claim `{k}` is set by the dev issuer"));
        }
        set_field(&mut claims, k, serde_json::Value::String(v.clone()));
    }
    key.sign_jwt("JWT", &claims).map_err(|e| e.to_string())
}
