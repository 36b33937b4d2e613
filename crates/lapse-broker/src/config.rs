//! `lapse.toml`. Unknown keys are errors that name the key; durations are strings
//! such as `90s`, `15m`, `2h`.

use lapse_core::TtlDuration;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on, e.g. `127.0.0.1:7800`.
    pub listen: SocketAddr,
    /// The URL clients use to reach Lapse (the token issuer and the base of DPoP `htu`).
    /// Defaults to `http://{listen}`.
    pub public_url: Option<String>,
    /// `sqlite://PATH`.
    pub store: String,
    /// Folder of `*.cedar` policies and `*.cedarschema` fragments.
    pub policies: PathBuf,
    /// Ceiling on any credential's lifetime.
    pub max_ttl: TtlDuration,
    /// Lifetime when a request names none.
    #[serde(default = "default_ttl")]
    pub default_ttl: TtlDuration,
    /// Ceiling on a grant's lifetime across renewals.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime: TtlDuration,
    /// Most hops of sub-agent delegation below a workload's own grant.
    #[serde(default = "default_max_delegation_depth")]
    pub max_delegation_depth: u32,
    /// Hard ceiling on a break-glass grant's lifetime, whatever its policy allows.
    #[serde(default = "default_break_glass_max_ttl")]
    pub break_glass_max_ttl: TtlDuration,
    /// How long a request that needs approval stays approvable.
    #[serde(default = "default_approval_window")]
    pub approval_window: TtlDuration,
    /// PKCS#8 PEM Ed25519 key that signs tokens and audit checkpoints; created if
    /// absent. Required without `key_encryption_key`; with it, only read to seed an
    /// empty ring (so tokens signed before the move keep verifying), else optional.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// Where the key-encryption key is (`env:NAME` or `file:PATH`). Set, the signing
    /// key ring lives in the store, shared by every replica and rotatable; unset,
    /// `signing_key` is the one key.
    #[serde(default)]
    pub key_encryption_key: Option<String>,
    /// How long a new key is published before it signs (verifiers' JWKS caches
    /// must have it by then).
    #[serde(default = "default_key_publish_delay")]
    pub key_publish_delay: TtlDuration,
    /// How often each replica re-reads the key ring from the store.
    #[serde(default = "default_key_refresh")]
    pub key_refresh: TtlDuration,
    /// How long the replica that runs the singleton jobs (sweeper, cleanup,
    /// reconciler) holds the role without renewing it: one that stalls loses it
    /// within this, and another takes over. Renewed five times per lease.
    #[serde(default = "default_leader_lease")]
    pub leader_lease: TtlDuration,
    /// How long a store operation may wait for a lock before failing closed.
    #[serde(default = "default_store_timeout")]
    pub store_timeout: TtlDuration,
    /// How old a DPoP proof may be.
    #[serde(default = "default_dpop_max_age")]
    pub dpop_max_age: TtlDuration,
    #[serde(default, rename = "issuer")]
    pub issuers: Vec<IssuerEntry>,
    #[serde(default, rename = "audience")]
    pub audiences: Vec<AudienceEntry>,
    #[serde(default, rename = "operator")]
    pub operators: Vec<OperatorEntry>,
    #[serde(default, rename = "owner")]
    pub owners: Vec<OwnerEntry>,
    /// Dynamic PostgreSQL users, one `[[postgres]]` per audience.
    #[serde(default, rename = "postgres")]
    pub postgres: Vec<lapse_providers::postgres::PostgresConfig>,
    /// Dynamic MariaDB/MySQL accounts, one `[[mysql]]` per audience.
    #[serde(default, rename = "mysql")]
    pub mysql: Vec<lapse_providers::mysql::MysqlConfig>,
    /// Redis ACL users, one `[[redis]]` per audience.
    #[serde(default, rename = "redis")]
    pub redis: Vec<lapse_providers::redis::RedisConfig>,
    /// How often the reconciler compares targets with the store (also at start).
    #[serde(default = "default_reconcile_interval")]
    pub reconcile_interval: TtlDuration,
    /// How often the sweeper ends grants whose time is up (default: twice a second).
    #[serde(default)]
    pub sweep_interval: Option<TtlDuration>,
    /// The standing-privilege report flags a grant alive (through renewals) longer
    /// than this, and a workload holding access for more than `standing_share` of
    /// the report window.
    #[serde(default = "default_standing_span")]
    pub standing_span: TtlDuration,
    #[serde(default = "default_standing_share")]
    pub standing_share: f64,
    /// Signed JSON events for requests that wait for people and their decisions.
    #[serde(default)]
    pub webhook: Option<crate::notify::WebhookConfig>,
    /// How long a console sign-in lasts. Sessions are signed cookies: rotating an
    /// operator's token or password, or removing the operator, ends theirs at once.
    #[serde(default = "default_console_session")]
    pub console_session: TtlDuration,
    /// Rate limits, the pending-request cap and header limits.
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// TLS on the listener (and client certificates); plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<lapse_tls::TlsConfig>,
}

fn default_console_session() -> TtlDuration {
    TtlDuration::from_secs(8 * 3600)
}

fn default_break_glass_max_ttl() -> TtlDuration {
    TtlDuration::from_secs(15 * 60)
}
fn default_reconcile_interval() -> TtlDuration {
    TtlDuration::from_secs(30)
}
fn default_standing_span() -> TtlDuration {
    TtlDuration::from_secs(8 * 3600)
}
fn default_standing_share() -> f64 {
    0.9
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerEntry {
    pub issuer: String,
    /// `file://PATH` or `https://…`.
    pub jwks: String,
    pub audience: String,
    /// Template over claims naming the workload; default `{sub}`.
    #[serde(default = "default_workload")]
    pub workload: String,
    #[serde(default = "default_leeway")]
    pub leeway: TtlDuration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudienceEntry {
    /// The audience (Cedar `Resource` id and the token's `aud`).
    pub id: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorEntry {
    pub name: String,
    /// Hex SHA-256 of the operator's API token (`lapse operator token` makes one).
    #[serde(default)]
    pub token_sha256: Option<String>,
    /// Argon2id PHC string of a password for the console (`lapse operator password`
    /// makes one). People sign in with it; automation uses the API token.
    #[serde(default)]
    pub password_argon2: Option<String>,
    /// Any of `admin`, `read`, `revoke`, `introspect`, `approve`, `gate`, `signal`.
    pub roles: Vec<Role>,
    /// Approver groups (`@approvers("GROUP")` in policy) this operator belongs to.
    /// The `admin` role does not imply any: who may approve is named explicitly.
    #[serde(default)]
    pub groups: Vec<String>,
    /// For a `gate`: the audiences it guards; its use reports count only for
    /// grants of these (empty: any).
    #[serde(default)]
    pub audiences: Vec<String>,
}

/// `[[owner]]`: the people responsible for workloads. Separation of duties: an
/// owner never approves a request of a workload they own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerEntry {
    /// A workload URI, or a prefix ending in `*` (`spiffe://example.org/ci/*`).
    pub workload: String,
    /// Operator names.
    pub operators: Vec<String>,
}

impl OwnerEntry {
    pub fn covers(&self, workload: &str) -> bool {
        match self.workload.strip_suffix('*') {
            Some(prefix) => workload.starts_with(prefix),
            None => workload == self.workload,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Read,
    Revoke,
    Introspect,
    /// Approve or deny pending requests (within the operator's groups).
    Approve,
    /// A gate: follow the revocation feed, fetch the policy bundle, report use.
    Gate,
    /// Send signals (`POST /v1/signals`) that end matching grants.
    Signal,
}

fn default_ttl() -> TtlDuration {
    TtlDuration::from_secs(300)
}
fn default_max_lifetime() -> TtlDuration {
    TtlDuration::from_secs(3600)
}
fn default_max_delegation_depth() -> u32 {
    3
}
fn default_approval_window() -> TtlDuration {
    TtlDuration::from_secs(900)
}
fn default_key_publish_delay() -> TtlDuration {
    TtlDuration::from_secs(120)
}
fn default_key_refresh() -> TtlDuration {
    TtlDuration::from_secs(10)
}
fn default_leader_lease() -> TtlDuration {
    TtlDuration::from_secs(5)
}
fn default_store_timeout() -> TtlDuration {
    TtlDuration::from_secs(5)
}
fn default_dpop_max_age() -> TtlDuration {
    TtlDuration::from_secs(60)
}
fn default_workload() -> String {
    "{sub}".into()
}
fn default_leeway() -> TtlDuration {
    TtlDuration::from_secs(30)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config `{path}`: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config `{path}`: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })?;
        // Relative paths in a config file are relative to the file.
        if let Some(base) = path.parent() {
            cfg.resolve_relative(base);
        }
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| e.message().to_owned() + &span_hint(text, e.span()))?;
        cfg.check()?;
        Ok(cfg)
    }

    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.policies);
        if let Some(k) = &mut self.signing_key {
            fix(k);
        }
        if let Some(t) = &mut self.tls {
            fix(&mut t.cert);
            fix(&mut t.key);
            if let Some(ca) = &mut t.client_ca {
                fix(ca);
            }
        }
        if let Some(rest) = self.store.strip_prefix("sqlite://") {
            let p = Path::new(rest);
            if p.is_relative() {
                self.store = format!("sqlite://{}", base.join(p).display());
            }
        }
        for i in &mut self.issuers {
            if let Some(rest) = i.jwks.strip_prefix("file://") {
                let p = Path::new(rest);
                if p.is_relative() {
                    i.jwks = format!("file://{}", base.join(p).display());
                }
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.max_ttl.secs() == 0 {
            return Err("`max_ttl` must be longer than zero".into());
        }
        if self.issuers.is_empty() {
            return Err(
                "at least one `[[issuer]]` is required: workloads must prove who they are".into(),
            );
        }
        match &self.key_encryption_key {
            None if self.signing_key.is_none() => {
                return Err(
                    "`signing_key` is required unless `key_encryption_key` keeps the key ring in the store"
                        .into(),
                );
            }
            // A replica publishes a new key for `key_publish_delay` before signing
            // with it; another that re-reads the ring less often would meet tokens
            // signed with a key it has never seen.
            Some(_) if self.key_publish_delay.secs() <= self.key_refresh.secs() => {
                return Err(format!(
                    "`key_publish_delay` ({}s) must be longer than `key_refresh` ({}s): every replica must have published a new key before any signs with it",
                    self.key_publish_delay.secs(),
                    self.key_refresh.secs()
                ));
            }
            _ => {}
        }
        if self.leader_lease.secs() == 0 {
            return Err("`leader_lease` must be at least 1s".into());
        }
        let mut names = std::collections::HashSet::new();
        for op in &self.operators {
            if !names.insert(op.name.as_str()) {
                return Err(format!("operator `{}` is defined twice", op.name));
            }
            if op.token_sha256.is_none() && op.password_argon2.is_none() {
                return Err(format!(
                    "operator `{}`: give it a `token_sha256`, a `password_argon2`, or both",
                    op.name
                ));
            }
            if let Some(t) = &op.token_sha256
                && (t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(format!(
                    "operator `{}`: `token_sha256` must be 64 hex digits",
                    op.name
                ));
            }
            if let Some(p) = &op.password_argon2 {
                crate::password::check_password_hash(p)
                    .map_err(|e| format!("operator `{}`: `password_argon2`: {e}", op.name))?;
            }
        }
        for i in &self.issuers {
            lapse_identity::JwksSource::parse(&i.jwks)
                .map_err(|e| format!("issuer `{}`: {e}", i.issuer))?;
            i.workload
                .parse::<lapse_identity::WorkloadTemplate>()
                .map_err(|e| format!("issuer `{}`: {e}", i.issuer))?;
        }
        if let Some(u) = &self.public_url {
            url::Url::parse(u).map_err(|e| format!("`public_url` `{u}` is not a URL: {e}"))?;
        }
        let audiences: std::collections::HashSet<&str> =
            self.audiences.iter().map(|a| a.id.as_str()).collect();
        lapse_providers::registry::validate(&self.providers(), &audiences)?;
        if !(0.0..=1.0).contains(&self.standing_share) {
            return Err("`standing_share` must be between 0 and 1".into());
        }
        Ok(())
    }

    /// Every provider table, whatever its kind.
    pub fn providers(&self) -> Vec<lapse_providers::registry::ProviderConfig> {
        use lapse_providers::registry::ProviderConfig;
        let postgres = self.postgres.iter().cloned().map(ProviderConfig::Postgres);
        let mysql = self.mysql.iter().cloned().map(ProviderConfig::Mysql);
        let redis = self.redis.iter().cloned().map(ProviderConfig::Redis);
        postgres.chain(mysql).chain(redis).collect()
    }

    /// Where the signing key ring comes from.
    pub fn key_sources(&self) -> lapse_keyring::KeySources<'_> {
        lapse_keyring::KeySources {
            signing_key: self.signing_key.as_deref(),
            key_encryption_key: self.key_encryption_key.as_deref(),
        }
    }

    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{}", self.listen)
            })
            .trim_end_matches('/')
            .to_owned()
    }
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map(|s| {
        let line = text
            .get(..s.start)
            .map_or(1, |t| t.matches('\n').count() + 1);
        format!(" (line {line})")
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
listen = "127.0.0.1:7800"
store = "sqlite://lapse.db"
policies = "policies"
max_ttl = "15m"
signing_key = "key.pem"
[[issuer]]
issuer = "https://issuer"
jwks = "file://jwks.json"
audience = "lapse"
"#;

    #[test]
    fn minimal_config_parses_with_defaults() -> Result<(), String> {
        let c = Config::parse(MIN)?;
        assert_eq!(c.max_ttl.secs(), 900);
        assert_eq!(c.default_ttl.secs(), 300);
        assert_eq!(c.issuers[0].workload, "{sub}");
        assert_eq!(c.public_url(), "http://127.0.0.1:7800");
        Ok(())
    }

    /// The replicas example (examples/replicas/compose.yaml mounts it) is a valid
    /// config: PostgreSQL store, key ring sealed under a key from the environment.
    #[test]
    fn the_replicas_example_parses() -> Result<(), String> {
        let c = Config::parse(include_str!("../../../examples/replicas/lapse.toml"))?;
        assert!(c.store.starts_with("postgres://"));
        // No password in the file: it comes from PGPASSWORD.
        assert_eq!(lapse_store::redact_url(&c.store), c.store);
        assert_eq!(c.key_encryption_key.as_deref(), Some("env:LAPSE_KEK"));
        assert_eq!(c.public_url(), "http://localhost:7800");
        assert_eq!(c.listen.to_string(), "0.0.0.0:7800");
        assert_eq!(
            c.signing_key, None,
            "the ring in the store needs no key file"
        );
        Ok(())
    }

    #[test]
    fn a_key_file_or_a_key_ring_is_required() {
        let no_key = MIN.replace("signing_key = \"key.pem\"\n", "");
        let e = Config::parse(&no_key).err().unwrap_or_default();
        assert!(e.contains("`signing_key` is required"), "{e}");
        let ring = no_key.replace(
            "max_ttl = \"15m\"",
            "max_ttl = \"15m\"\nkey_encryption_key = \"env:K\"",
        );
        assert!(Config::parse(&ring).is_ok());
    }

    #[test]
    fn a_new_key_must_be_published_longer_than_replicas_take_to_read_it() {
        let ring = MIN.replace(
            "max_ttl = \"15m\"",
            "max_ttl = \"15m\"\nkey_encryption_key = \"env:K\"\nkey_refresh = \"30s\"",
        );
        for (delay, ok) in [("10s", false), ("30s", false), ("31s", true)] {
            let text = ring.replace(
                "key_refresh",
                &format!("key_publish_delay = \"{delay}\"\nkey_refresh"),
            );
            let r = Config::parse(&text);
            assert_eq!(r.is_ok(), ok, "{delay}: {r:?}");
            if let Err(e) = r {
                assert!(
                    e.contains("`key_publish_delay` (") && e.contains("`key_refresh` (30s)"),
                    "{e}"
                );
            }
        }
        // A single key file never rotates: the two do not matter then.
        let single = MIN.replace(
            "max_ttl = \"15m\"",
            "max_ttl = \"15m\"\nkey_publish_delay = \"1s\"",
        );
        assert!(Config::parse(&single).is_ok());
    }

    #[test]
    fn the_leader_lease_defaults_to_five_seconds_and_is_never_zero() -> Result<(), String> {
        assert_eq!(Config::parse(MIN)?.leader_lease.secs(), 5);
        let zero = MIN.replace(
            "max_ttl = \"15m\"",
            "max_ttl = \"15m\"\nleader_lease = \"0s\"",
        );
        let e = Config::parse(&zero).err().unwrap_or_default();
        assert!(e.contains("`leader_lease`"), "{e}");
        Ok(())
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse(&format!("{MIN}\nmax_tll = \"5m\""))
            .err()
            .unwrap_or_default();
        assert!(e.contains("max_tll"), "{e}");
        let e = Config::parse(
            &MIN.replace("audience = \"lapse\"", "audience = \"lapse\"\naudiance = 1"),
        )
        .err()
        .unwrap_or_default();
        assert!(e.contains("audiance"), "{e}");
    }

    /// Every provider kind is read from its own table and goes through one
    /// registry check: its audience must be declared, one table per audience.
    #[test]
    fn provider_tables_of_every_kind_meet_in_one_registry() -> Result<(), String> {
        let tables = r#"
[[audience]]
id = "orders-db"
[[audience]]
id = "orders-mysql"
[[postgres]]
audience = "orders-db"
admin_url = "env:PG_ADMIN"
[[postgres.grant]]
action = "read"
schema = "orders"
privileges = ["SELECT", "INSERT"]
[[mysql]]
audience = "orders-mysql"
admin_url = "env:MYSQL_ADMIN"
[[mysql.grant]]
action = "read"
database = "app"
privileges = ["SELECT"]
[[audience]]
id = "orders-cache"
[[redis]]
audience = "orders-cache"
admin_url = "env:REDIS_ADMIN"
[[redis.grant]]
action = "read"
keys = ["orders:*"]
commands = ["+get"]
"#;
        let c = Config::parse(&format!("{MIN}{tables}"))?;
        let kinds: Vec<_> = c.providers().iter().map(|p| p.kind()).collect();
        assert_eq!(kinds, ["postgres", "mysql", "redis"]);
        let everything = tables.replace("keys = [\"orders:*\"]", "keys = [\"*\"]");
        let e = Config::parse(&format!("{MIN}{everything}"))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("[[redis]] `orders-cache`") && e.contains("allow_all_keys"),
            "{e}"
        );

        let unknown = tables.replace("audience = \"orders-mysql\"", "audience = \"nope\"");
        let e = Config::parse(&format!("{MIN}{unknown}"))
            .err()
            .unwrap_or_default();
        assert!(e.contains("[[mysql]] audience `nope`"), "{e}");

        let twice = tables.replace("audience = \"orders-mysql\"", "audience = \"orders-db\"");
        let e = Config::parse(&format!("{MIN}{twice}"))
            .err()
            .unwrap_or_default();
        assert!(e.contains("two provider tables ([[mysql]]"), "{e}");

        let all = tables.replace("privileges = [\"SELECT\"]", "privileges = [\"ALL\"]");
        let e = Config::parse(&format!("{MIN}{all}"))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("[[mysql]] `orders-mysql`") && e.contains("`ALL`"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn bad_durations_and_values_are_refused() {
        assert!(Config::parse(&MIN.replace("\"15m\"", "\"15 minutes\"")).is_err());
        assert!(
            Config::parse(&MIN.replace("file://jwks.json", "http://example.com/jwks")).is_err()
        );
        assert!(Config::parse(&MIN.replace("[[issuer]]", "[[nope]]")).is_err());
    }
}
