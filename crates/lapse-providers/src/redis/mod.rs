//! Redis: one real, short-lived ACL user per grant (Redis 6.2+; the admin checks
//! of `prepare` need 7.0).
//!
//! Each grant gets the user `<prefix>_<grant id>` (`lapse_gr_0191…`, lower case,
//! deterministic), made by one `ACL SETUSER` whose every rule is its own
//! protocol argument (nothing is pasted into a command string): `reset on
//! #<sha256 of the password> resetchannels ~<key patterns> &<channel patterns>
//! -@all <the grant's command rules> -@admin -@dangerous -@scripting`. The
//! password Lapse generated never reaches the server: `#` sets the SHA-256 Redis
//! stores anyway, so it is in no `MONITOR` feed, `SLOWLOG` or `ACL LOG`. The
//! trailing rules take back what a broad category brings (`+@write` includes
//! `FLUSHALL`, which no key pattern limits; see [`acl::TRAILING_RULES`]). The
//! rules of a grant of several actions are those of their `[[redis.grant]]`
//! entries in the order of `lapse.toml`; ACL has one set of key patterns per
//! user, so every command of the grant reaches every key pattern of the grant.
//!
//! What key patterns do not limit (Redis' design, not Lapse's): `SCAN` and
//! `RANDOMKEY` show key names outside the patterns (not their values), and
//! patterns apply in every logical database (`SELECT` is not limited by ACL).
//!
//! ## The marker
//! Redis users carry no comment, so Lapse keeps its mark in a hash of its own,
//! `marker_key` (default `lapse:credentials`): field = user name, value = JSON
//! `{grant, audience, prefix, valid_until}`. [`CredentialProvider::list`] reports
//! users with a mark only, so a reconciler never deletes a user Lapse did not
//! make; users named like Lapse's without a mark are
//! [`CredentialProvider::strays`]. The mark is written before `ACL SETUSER`, so a
//! crash in between leaves a mark without a user (harmless: it grants nothing;
//! `destroy` removes it, and `list` removes those whose `valid_until` has
//! passed), never a user without a mark. No key pattern of a grant may match the
//! marker key (checked with Redis' own glob rules, [`acl::glob_match`]), except
//! an all-matching one under `allow_all_keys = true`: such a credential can read
//! and change the marker (and so hide itself from the reconciler; the sweeper
//! still destroys it at its grant's end, by name).
//!
//! ## Expiry when Lapse is down: not enforced by the server
//! Redis ACL has no expiry: nothing in the server ends a user at its grant's
//! end. While the broker is down a credential stays usable until the broker is
//! back, when the reconciler (at start) and the sweeper destroy what outlived its
//! grant; a broker that never comes back leaves the users in place (the marker's
//! `valid_until` tells an operator which are overdue). [`CredentialProvider::extend`]
//! only checks the user is still there and moves the marker's `valid_until`;
//! [`Existing::valid_until`] is always `None`.
//!
//! ## Destroy
//! `ACL SETUSER <name> off` first, so no new `AUTH` succeeds (sessions already
//! authenticated go on); then `CLIENT KILL USER <name>` and `ACL DELUSER <name>`
//! (which also disconnects the user's clients); then `CLIENT LIST` is polled,
//! bounded (5 s), until no connection of the user is left, killing by id any that
//! is; then the mark goes. Gone already is success, and a mark without a user is
//! removed too. `destroy` works from the name alone (no `prepare` needed), so
//! revocation never waits on setup.
//!
//! ## Least privilege for the admin user (documented in README)
//! ```text
//! ACL SETUSER lapse_admin on >… ~lapse:credentials resetchannels -@all +acl|setuser +acl|deluser +acl|getuser +acl|users +acl|dryrun +client|kill +client|list +hset +hdel +hget +hgetall +info +command|info
//! ```
//! (see [`admin_rules`]; `prepare` checks each with `ACL DRYRUN` and names what
//! is missing). Be clear about what `+acl|setuser` is: whoever holds it can make
//! a user with `+@all`, so this account is as powerful as the server's
//! administrator; what the list above limits is what a leaked admin password can
//! do without that step showing in `ACL LOG` and `ACL LIST`. The admin's URL
//! should select database 0 (or the account also needs `+select`). Lapse does not
//! run `ACL SAVE`: users it makes live in memory only, and whether an `aclfile`
//! is written is the operator's choice (a restarted Redis without one has none
//! of them, which is also fine: `destroy` of a missing user is success).

pub mod acl;
pub mod admin;
pub mod reply;

use crate::{
    CredentialProvider, CredentialSpec, Destroyed, Existing, Handout, ProviderError, Secret, Stray,
    StrayKind,
};
use ::redis::{ConnectionAddr, IntoConnectionInfo, Value, cmd};
use admin::Admin;
use async_trait::async_trait;
use lapse_core::{Clock, GrantId, SystemClock, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;
use tokio::sync::OnceCell;

/// How long `destroy` waits for killed connections to leave `CLIENT LIST`.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// A mark without a user is removed by `list` once its `valid_until` is this far
/// behind (a `create` in flight writes the mark just before the user).
const STALE_MARK_SECS: i64 = 60;

/// What the admin user runs, each checked by `prepare` (see [`admin_rules`]).
pub const ADMIN_COMMANDS: &[&str] = &[
    "+acl|setuser",
    "+acl|deluser",
    "+acl|getuser",
    "+acl|users",
    "+acl|dryrun",
    "+client|kill",
    "+client|list",
    "+hset",
    "+hdel",
    "+hget",
    "+hgetall",
    "+info",
    "+command|info",
];

/// The admin user's rules after `on >password`: the marker key only, no
/// channel, and [`ADMIN_COMMANDS`].
pub fn admin_rules(marker_key: &str) -> Vec<String> {
    let mut rules = vec![
        format!("~{marker_key}"),
        "resetchannels".to_owned(),
        "-@all".to_owned(),
    ];
    rules.extend(ADMIN_COMMANDS.iter().map(|c| (*c).to_owned()));
    rules
}

/// `[[redis]]` in `lapse.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// The audience whose grants get a user.
    pub audience: String,
    /// Where the admin URL (`redis://user:pass@host:port`, or `rediss://…` for
    /// TLS, the server's certificate verified against the system's roots) is:
    /// `env:NAME` or `file:/path`, never the URL itself.
    pub admin_url: String,
    /// Generated user names start with this and `_` (`[a-z][a-z0-9_]*`, at most
    /// 16 characters).
    #[serde(default = "default_prefix")]
    pub user_prefix: String,
    /// Host and port handed to the requester; default: those of the admin URL.
    pub public_host: Option<String>,
    pub public_port: Option<u16>,
    /// The hash holding Lapse's marks (see the module docs). No grant's key
    /// pattern may match it.
    #[serde(default = "default_marker_key")]
    pub marker_key: String,
    /// Whether a key or channel pattern may match everything (`*`).
    #[serde(default)]
    pub allow_all_keys: bool,
    /// What each action means in this server.
    #[serde(default, rename = "grant")]
    pub grants: Vec<PrivilegeConfig>,
}

/// `[[redis.grant]]`: `action` means `commands` on keys matching `keys` (ACL
/// `~`) and Pub/Sub channels matching `channels` (ACL `&`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivilegeConfig {
    pub action: String,
    pub keys: Vec<String>,
    #[serde(default)]
    pub channels: Vec<String>,
    /// `+get`, `+@read`, `-keys`, `+config|get`-shaped rules; see
    /// [`acl::command`] for what is refused.
    pub commands: Vec<String>,
}

fn default_prefix() -> String {
    "lapse".into()
}
fn default_marker_key() -> String {
    "lapse:credentials".into()
}

/// Error messages echo config values; keep what they echo short and printable.
fn shown(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(32)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 32 {
        out.push('…');
    }
    out
}

impl RedisConfig {
    /// Checks everything that can be checked without a server.
    pub fn validate(&self) -> Result<(), String> {
        if self.audience.is_empty() || self.audience.chars().count() > 255 {
            return Err("`audience` must be 1-255 characters".into());
        }
        let p = &self.user_prefix;
        let ok_prefix = !p.is_empty()
            && p.len() <= 16
            && p.starts_with(|c: char| c.is_ascii_lowercase())
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok_prefix {
            return Err(format!(
                "`user_prefix` `{}` must be 1-16 of [a-z0-9_], starting with a letter",
                shown(p)
            ));
        }
        if !(self.admin_url.starts_with("env:") || self.admin_url.starts_with("file:")) {
            return Err(
                "`admin_url` must say where the URL is (`env:NAME` or `file:/path`), not contain it"
                    .into(),
            );
        }
        if let Some(h) = &self.public_host
            && (h.is_empty()
                || h.len() > 255
                || h.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            return Err(format!("`public_host` `{}` is not a host name", shown(h)));
        }
        let m = &self.marker_key;
        if m.is_empty()
            || m.len() > 256
            || m.contains(|c: char| c.is_whitespace() || c.is_control() || "*?[]\\".contains(c))
        {
            return Err(format!(
                "`marker_key` `{}` must be 1-256 characters without whitespace, control characters or glob characters (*?[]\\)",
                shown(m)
            ));
        }
        if self.grants.is_empty() {
            return Err(format!(
                "audience `{}`: at least one [[redis.grant]] is needed",
                self.audience
            ));
        }
        for g in &self.grants {
            self.validate_grant(g)?;
        }
        Ok(())
    }

    fn validate_grant(&self, g: &PrivilegeConfig) -> Result<(), String> {
        let a = shown(&g.action);
        if g.action.is_empty() {
            return Err("[[redis.grant]] `action` is empty".into());
        }
        if g.keys.is_empty() && g.channels.is_empty() {
            return Err(format!(
                "action `{a}`: `keys` and `channels` are both empty"
            ));
        }
        if g.keys.len() + g.channels.len() > acl::MAX_RULES || g.commands.len() > acl::MAX_RULES {
            return Err(format!(
                "action `{a}`: more than {} `keys`, `channels` or `commands`",
                acl::MAX_RULES
            ));
        }
        for (field, patterns) in [("keys", &g.keys), ("channels", &g.channels)] {
            for k in patterns {
                acl::pattern(k)
                    .map_err(|e| format!("action `{a}`: `{field}` entry `{}` {e}", shown(k)))?;
                if acl::matches_everything(k) {
                    if !self.allow_all_keys {
                        return Err(format!(
                            "action `{a}`: `{field}` entry `{}` matches everything: name the keys, or set `allow_all_keys = true`",
                            shown(k)
                        ));
                    }
                } else if field == "keys"
                    && acl::glob_match(k.as_bytes(), self.marker_key.as_bytes())
                {
                    return Err(format!(
                        "action `{a}`: `keys` entry `{}` matches Lapse's `marker_key` `{}`",
                        shown(k),
                        shown(&self.marker_key)
                    ));
                }
            }
        }
        if g.commands.is_empty() {
            return Err(format!("action `{a}`: `commands` is empty"));
        }
        for c in &g.commands {
            acl::command(c)
                .map_err(|e| format!("action `{a}`: `commands` entry `{}` {e}", shown(c)))?;
        }
        Ok(())
    }

    fn admin_url(&self) -> Result<String, ProviderError> {
        crate::read_admin_secret(&self.admin_url, &self.audience)
    }
}

/// One mark in the marker hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Mark {
    grant: String,
    audience: String,
    prefix: String,
    /// Unix seconds.
    valid_until: i64,
}

/// Whether `name` is shaped like a name generated with `prefix`.
pub fn is_generated(prefix: &str, name: &str) -> bool {
    grant_of(prefix, name).is_some()
}

/// The grant whose generated name `name` is.
fn grant_of(prefix: &str, name: &str) -> Option<GrantId> {
    let id = name.strip_prefix(prefix)?.strip_prefix('_')?;
    let hex = id.strip_prefix("gr_")?;
    if hex.len() != 32
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    id.parse().ok()
}

/// Whether `name` is shaped like a generated name of any valid prefix.
fn lapse_shaped(name: &str) -> bool {
    name.rsplit_once("_gr_").is_some_and(|(prefix, _)| {
        prefix.len() <= 16
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && is_generated(prefix, name)
    })
}

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub struct RedisProvider {
    cfg: RedisConfig,
    admin: Admin,
    /// The admin's user name (`default` when the URL names none), for `ACL DRYRUN`.
    admin_user: String,
    host: String,
    port: u16,
    /// Set by the first successful `prepare`; `create` needs it.
    prepared: OnceCell<()>,
}

impl RedisProvider {
    /// Builds the provider; connects lazily (the server may come up after Lapse).
    pub fn new(cfg: RedisConfig) -> Result<Self, ProviderError> {
        cfg.validate().map_err(ProviderError::Config)?;
        let url = cfg.admin_url()?;
        let bad = |why: &str| {
            ProviderError::Config(format!(
                "audience `{}`: the URL in `{}` {why}",
                cfg.audience, cfg.admin_url
            ))
        };
        let scheme = url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("redis" | "rediss")) {
            return Err(bad("must start with `redis://` or `rediss://`"));
        }
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|_| bad("does not parse"))?;
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => {
                if *insecure {
                    // TLS that does not verify the server protects against nobody
                    // who can see the traffic.
                    return Err(bad(
                        "turns off server verification (`#insecure`): remove it",
                    ));
                }
                // rustls needs a process-wide crypto provider; Lapse uses ring.
                let _ = rustls::crypto::ring::default_provider().install_default();
                (host.clone(), *port)
            }
            _ => return Err(bad("must name a host and port")),
        };
        let settings = info.redis_settings().clone();
        let admin_user = settings.username().unwrap_or("default").to_owned();
        let password = settings.password().unwrap_or_default().to_owned();
        // No `CLIENT SETINFO` after connecting: the admin may not run it, and
        // each refusal would be an `ACL LOG` entry.
        let info = info.set_redis_settings(settings.set_skip_set_lib_name());
        let client = ::redis::Client::open(info).map_err(|_| bad("does not parse"))?;
        Ok(Self {
            admin: Admin::new(client, cfg.audience.clone(), vec![url, password]),
            admin_user,
            host: cfg.public_host.clone().unwrap_or(host),
            port: cfg.public_port.unwrap_or(port),
            prepared: OnceCell::new(),
            cfg,
        })
    }

    fn step(&self, step: &'static str, message: String) -> ProviderError {
        ProviderError::Step {
            target: self.cfg.audience.clone(),
            step,
            message,
        }
    }

    async fn flags_of(&self, name: &str) -> Result<Option<Vec<String>>, ProviderError> {
        let v = self
            .admin
            .run(cmd("ACL").arg("GETUSER").arg(name), "look up the user")
            .await?;
        Ok(reply::user_flags(&v))
    }

    async fn client_list(&self) -> Result<String, ProviderError> {
        let v = self
            .admin
            .run(cmd("CLIENT").arg("LIST"), "list connections")
            .await?;
        Ok(reply::text(&v).unwrap_or_default())
    }

    async fn marks(&self) -> Result<HashMap<String, Option<Mark>>, ProviderError> {
        let v = self
            .admin
            .run(cmd("HGETALL").arg(&self.cfg.marker_key), "read the marks")
            .await?;
        let mut marks = HashMap::new();
        let flat: Vec<(Value, Value)> = match v {
            Value::Map(pairs) => pairs,
            other => reply::items(&other)
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect(),
        };
        for (k, v) in flat {
            if let Some(name) = reply::text(&k) {
                let mark = reply::text(&v).and_then(|j| serde_json::from_str(&j).ok());
                marks.insert(name, mark);
            }
        }
        Ok(marks)
    }

    async fn users(&self) -> Result<Vec<String>, ProviderError> {
        let v = self
            .admin
            .run(cmd("ACL").arg("USERS"), "list users")
            .await?;
        Ok(reply::items(&v).iter().filter_map(reply::text).collect())
    }

    async fn write_mark(&self, name: &str, mark: &Mark) -> Result<(), ProviderError> {
        let json =
            serde_json::to_string(mark).map_err(|e| self.step("mark the user", e.to_string()))?;
        self.admin
            .run(
                cmd("HSET").arg(&self.cfg.marker_key).arg(name).arg(json),
                "mark the user",
            )
            .await
            .map(|_| ())
    }

    async fn unmark(&self, name: &str) -> Result<(), ProviderError> {
        self.admin
            .run(
                cmd("HDEL").arg(&self.cfg.marker_key).arg(name),
                "remove the mark",
            )
            .await
            .map(|_| ())
    }

    /// Checks the server and the admin's permissions (see the module docs).
    async fn prepare_once(&self) -> Result<(), ProviderError> {
        let info = match self
            .admin
            .run(cmd("INFO").arg("server"), "read the server version")
            .await
        {
            Ok(v) => v,
            Err(e) if admin::said(&e, "NOPERM") => {
                return Err(self.lacks(&["+info".to_owned()]));
            }
            Err(e) => return Err(e),
        };
        let version = reply::version(&reply::text(&info).unwrap_or_default());
        let Some((major, minor)) = version.filter(|v| *v >= (6, 2)) else {
            return Err(self.unfit(format!(
                "the server is {}; Lapse needs Redis 6.2 or later (ACL users with channel rules)",
                version.map_or("of an unknown version".to_owned(), |(a, b)| format!(
                    "Redis {a}.{b}"
                ))
            )));
        };
        if major >= 7 {
            self.check_admin().await?;
        } else {
            tracing::warn!(
                target = %self.cfg.audience,
                "Redis {major}.{minor} has no ACL DRYRUN: the admin user's permissions are not checked at start"
            );
        }
        self.check_commands().await
    }

    /// `ACL DRYRUN` of every command `create`, `destroy`, `list` and `extend` run.
    async fn check_admin(&self) -> Result<(), ProviderError> {
        let probe_user = format!("{}_probe", self.cfg.user_prefix);
        let marker = self.cfg.marker_key.as_str();
        let mut missing = Vec::new();
        for rule in ADMIN_COMMANDS {
            let args: Vec<&str> = match *rule {
                "+acl|setuser" => vec!["acl", "setuser", &probe_user, "off"],
                "+acl|deluser" => vec!["acl", "deluser", &probe_user],
                "+acl|getuser" => vec!["acl", "getuser", &probe_user],
                "+acl|users" => vec!["acl", "users"],
                "+client|kill" => vec!["client", "kill", "user", &probe_user],
                "+client|list" => vec!["client", "list"],
                "+hset" => vec!["hset", marker, &probe_user, "{}"],
                "+hdel" => vec!["hdel", marker, &probe_user],
                "+hget" => vec!["hget", marker, &probe_user],
                "+hgetall" => vec!["hgetall", marker],
                "+info" => vec!["info", "server"],
                "+command|info" => vec!["command", "info", "get"],
                // Shown by the dry run itself being refused.
                _ => continue,
            };
            let mut dry = cmd("ACL");
            dry.arg("DRYRUN").arg(&self.admin_user).arg(&args);
            let answer = match self.admin.run(&dry, "check the admin's permissions").await {
                Ok(v) => reply::text(&v).unwrap_or_default(),
                Err(e) if admin::said(&e, "NOPERM") => {
                    missing = vec!["+acl|dryrun".to_owned()];
                    break;
                }
                Err(e) => return Err(e),
            };
            if answer != "OK" {
                // The hash commands are checked on the marker key.
                if rule.starts_with("+h") {
                    missing.push(format!("{rule} on ~{marker}"));
                } else {
                    missing.push((*rule).to_owned());
                }
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(self.lacks(&missing))
    }

    /// What the target cannot serve: the broker refuses to start on it.
    fn unfit(&self, message: String) -> ProviderError {
        ProviderError::Unfit {
            target: self.cfg.audience.clone(),
            message,
        }
    }

    fn lacks(&self, missing: &[String]) -> ProviderError {
        self.unfit(format!(
            "admin user `{}` lacks {} (needed: {})",
            self.admin_user,
            missing
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", "),
            admin_rules(&self.cfg.marker_key).join(" ")
        ))
    }

    /// Every command a grant adds must exist in this server and must not be
    /// administrative, dangerous or scripting there.
    async fn check_commands(&self) -> Result<(), ProviderError> {
        let names: BTreeSet<String> = self
            .cfg
            .grants
            .iter()
            .flat_map(|g| &g.commands)
            .filter_map(|c| c.strip_prefix('+'))
            .filter(|c| !c.starts_with('@'))
            .map(str::to_ascii_lowercase)
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = names.into_iter().collect();
        let v = self
            .admin
            .run(
                cmd("COMMAND").arg("INFO").arg(&names),
                "look up the granted commands",
            )
            .await?;
        let found = reply::command_categories(&v);
        for (i, name) in names.iter().enumerate() {
            match found.get(i) {
                Some(Some(categories)) => {
                    let bad = categories.iter().find(|c| {
                        acl::FORBIDDEN_CATEGORIES
                            .iter()
                            .any(|f| c.strip_prefix('@') == Some(*f))
                    });
                    if let Some(bad) = bad {
                        return Err(self.unfit(format!(
                            "[[redis.grant]] command `+{name}` is `{bad}` in this server: never granted"
                        )));
                    }
                }
                _ => {
                    return Err(self.unfit(format!(
                        "[[redis.grant]] names command `{name}`, which this server does not have"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The rules of `actions`: entries in `lapse.toml` order.
    fn rules_for(&self, actions: &[String], hash: &str) -> Vec<String> {
        let entries: Vec<&PrivilegeConfig> = self
            .cfg
            .grants
            .iter()
            .filter(|g| actions.contains(&g.action))
            .collect();
        let mut keys: Vec<&str> = Vec::new();
        let mut channels: Vec<&str> = Vec::new();
        for g in &entries {
            for k in &g.keys {
                if !keys.contains(&k.as_str()) {
                    keys.push(k);
                }
            }
            for c in &g.channels {
                if !channels.contains(&c.as_str()) {
                    channels.push(c);
                }
            }
        }
        let commands: Vec<&str> = entries
            .iter()
            .flat_map(|g| g.commands.iter().map(String::as_str))
            .collect();
        acl::setuser_rules(hash, &keys, &channels, &commands)
    }

    /// Kills what is left of `name`'s connections until none is, bounded by
    /// [`KILL_WAIT`]; adds every connection seen to `seen`. Answers how many
    /// are left.
    async fn end_connections(
        &self,
        name: &str,
        seen: &mut HashSet<u64>,
    ) -> Result<usize, ProviderError> {
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        let mut killed: HashSet<u64> = HashSet::new();
        loop {
            let left = reply::connections_of(&self.client_list().await?, name);
            seen.extend(&left);
            if left.is_empty() {
                return Ok(0);
            }
            for id in &left {
                if killed.insert(*id) {
                    match self
                        .admin
                        .run(
                            cmd("CLIENT").arg("KILL").arg("ID").arg(*id),
                            "kill connections",
                        )
                        .await
                    {
                        Ok(_) => {}
                        // It ended by itself.
                        Err(e) if admin::said(&e, "No such client") => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(left.len());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl CredentialProvider for RedisProvider {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn target(&self) -> &str {
        &self.cfg.audience
    }

    fn name_for(&self, grant: GrantId) -> String {
        // `GrantId` renders as `gr_` + 32 lower-case hex digits.
        format!("{}_{grant}", self.cfg.user_prefix).to_ascii_lowercase()
    }

    async fn prepare(&self) -> Result<(), ProviderError> {
        self.prepared
            .get_or_try_init(|| self.prepare_once())
            .await
            .map(|_| ())
    }

    fn unmapped(&self, actions: &[&str]) -> Vec<String> {
        actions
            .iter()
            .filter(|a| !self.cfg.grants.iter().any(|g| g.action == **a))
            .map(|a| (*a).to_owned())
            .collect()
    }

    async fn sessions(&self, name: &str) -> Result<i64, ProviderError> {
        let n = reply::connections_of(&self.client_list().await?, name).len();
        Ok(i64::try_from(n).unwrap_or(i64::MAX))
    }

    async fn create(
        &self,
        spec: &CredentialSpec,
        secret: &Secret,
    ) -> Result<Handout, ProviderError> {
        self.prepare().await?;
        if grant_of(&self.cfg.user_prefix, &spec.name) != Some(spec.grant) {
            return Err(ProviderError::Config(format!(
                "`{}` is not the name Lapse gives grant `{}`",
                shown(&spec.name),
                spec.grant
            )));
        }
        // The mark first: a crash after it leaves a mark without a user, never a
        // user Lapse would not recognise as its own.
        let mark = Mark {
            grant: spec.grant.to_string(),
            audience: self.cfg.audience.clone(),
            prefix: self.cfg.user_prefix.clone(),
            valid_until: spec.valid_until.unix_seconds(),
        };
        self.write_mark(&spec.name, &mark).await?;
        let hash = sha256_hex(secret.expose());
        let mut setuser = cmd("ACL");
        setuser
            .arg("SETUSER")
            .arg(&spec.name)
            .arg(self.rules_for(&spec.actions, &hash));
        // Redis may quote a rule back: never the password or its hash in an error.
        let made = self
            .admin
            .run_scrubbed(&setuser, "create the user", &[secret.expose(), &hash])
            .await;
        if let Err(e) = made {
            // `ACL SETUSER` applies all its rules or none, so there is no user to
            // remove; the mark goes (best effort: `list` removes it later).
            if self.unmark(&spec.name).await.is_err() {
                tracing::warn!(target = %self.cfg.audience, user = %spec.name, "could not remove the mark of a failed create");
            }
            return Err(e);
        }
        Ok(Handout {
            kind: "redis",
            audience: self.cfg.audience.clone(),
            host: self.host.clone(),
            port: self.port,
            dbname: String::new(),
            username: spec.name.clone(),
            password: secret.expose().to_owned(),
            valid_until: spec.valid_until.rfc3339(),
        })
    }

    /// The server has no expiry to move (see the module docs): checks the user is
    /// still there and moves the mark's `valid_until`.
    async fn extend(&self, name: &str, valid_until: Timestamp) -> Result<(), ProviderError> {
        if self.flags_of(name).await?.is_none() {
            return Err(self.step("extend", format!("user `{}` does not exist", shown(name))));
        }
        let v = self
            .admin
            .run(
                cmd("HGET").arg(&self.cfg.marker_key).arg(name),
                "read the mark",
            )
            .await?;
        let mark = reply::text(&v).and_then(|j| serde_json::from_str::<Mark>(&j).ok());
        let mark = match mark {
            Some(m) => Mark {
                valid_until: valid_until.unix_seconds(),
                ..m
            },
            // A user without a mark is not Lapse's to extend.
            None => {
                return Err(self.step(
                    "extend",
                    format!("user `{}` carries no mark of Lapse's", shown(name)),
                ));
            }
        };
        self.write_mark(name, &mark).await
    }

    async fn destroy(&self, name: &str) -> Result<Destroyed, ProviderError> {
        if !lapse_shaped(name) {
            // Not a name Lapse generates (with any prefix, so names made before
            // `user_prefix` changed are still destroyed): nothing of Lapse's to
            // end, and `default` or an operator's user is never touched.
            tracing::warn!(target = %self.cfg.audience, user = %shown(name), "destroy of a name Lapse never generates: nothing done");
            return Ok(Destroyed {
                existed: false,
                sessions_terminated: 0,
                sessions_left: 0,
            });
        }
        let existed = self.flags_of(name).await?.is_some();
        let mut seen: HashSet<u64> = reply::connections_of(&self.client_list().await?, name)
            .into_iter()
            .collect();
        if existed {
            // 1. No new AUTH. (`ACL SETUSER` of a missing user would create it:
            // only for one that exists.)
            self.admin
                .run(
                    cmd("ACL").arg("SETUSER").arg(name).arg("off"),
                    "disable the user",
                )
                .await?;
            // 2. End its connections; deleting the user also disconnects them.
            match self
                .admin
                .run(
                    cmd("CLIENT").arg("KILL").arg("USER").arg(name),
                    "kill connections",
                )
                .await
            {
                Ok(_) => {}
                // Deleted meanwhile (a concurrent destroy).
                Err(e) if admin::said(&e, "No such user") => {}
                Err(e) => return Err(e),
            }
            self.admin
                .run(cmd("ACL").arg("DELUSER").arg(name), "delete the user")
                .await?;
        }
        // 3. None left, also when the user was gone already.
        let left = self.end_connections(name, &mut seen).await?;
        if left > 0 {
            return Err(ProviderError::SessionsLeft {
                target: self.cfg.audience.clone(),
                name: name.to_owned(),
                left: i64::try_from(left).unwrap_or(i64::MAX),
            });
        }
        self.unmark(name).await?;
        Ok(Destroyed {
            existed,
            sessions_terminated: i64::try_from(seen.len()).unwrap_or(i64::MAX),
            sessions_left: 0,
        })
    }

    async fn list(&self) -> Result<Vec<Existing>, ProviderError> {
        let marks = self.marks().await?;
        let users: HashSet<String> = self.users().await?.into_iter().collect();
        let clients = reply::clients(&self.client_list().await?);
        let start = format!("{}_", self.cfg.user_prefix);
        let ours = |m: &Mark| m.prefix == self.cfg.user_prefix && m.audience == self.cfg.audience;
        // Marks of this table whose user never came (a crash between the two
        // writes of `create`) and whose grant is over.
        let now = SystemClock.now().unix_seconds();
        for (name, mark) in &marks {
            if let Some(m) = mark
                && ours(m)
                && !users.contains(name)
                && m.valid_until + STALE_MARK_SECS < now
            {
                self.unmark(name).await?;
            }
        }
        let mut found = Vec::new();
        let mut names: Vec<&String> = users.iter().filter(|u| u.starts_with(&start)).collect();
        names.sort();
        for name in names {
            let Some(Some(mark)) = marks.get(name) else {
                continue;
            };
            if !ours(mark) {
                continue;
            }
            // Deleted since `ACL USERS`: not there any more.
            let Some(flags) = self.flags_of(name).await? else {
                continue;
            };
            let sessions = clients.iter().filter(|(_, u)| u == name).count();
            found.push(Existing {
                name: name.clone(),
                grant: mark.grant.parse().ok(),
                can_login: flags.iter().any(|f| f == "on"),
                valid_until: None,
                sessions: i64::try_from(sessions).unwrap_or(i64::MAX),
            });
        }
        Ok(found)
    }

    /// Users named like this provider's (`<prefix>_gr_<32 hex>`) without the mark
    /// of a Lapse installation using this prefix. Redis users join no group, so
    /// there are no group members to report.
    async fn strays(&self) -> Result<Vec<Stray>, ProviderError> {
        let marks = self.marks().await?;
        let clients = reply::clients(&self.client_list().await?);
        let mut users: Vec<String> = self
            .users()
            .await?
            .into_iter()
            .filter(|u| is_generated(&self.cfg.user_prefix, u))
            .filter(|u| !matches!(marks.get(u), Some(Some(m)) if m.prefix == self.cfg.user_prefix))
            .collect();
        users.sort();
        let mut strays = Vec::new();
        for name in users {
            let Some(flags) = self.flags_of(&name).await? else {
                continue;
            };
            let sessions = clients.iter().filter(|(_, u)| *u == name).count();
            strays.push(Stray {
                sessions: i64::try_from(sessions).unwrap_or(i64::MAX),
                kind: StrayKind::LookAlike,
                groups: Vec::new(),
                can_login: flags.iter().any(|f| f == "on"),
                name,
            });
        }
        Ok(strays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names() {
        let g = GrantId::generate();
        let name = format!("lapse_{g}");
        assert!(is_generated("lapse", &name));
        assert_eq!(grant_of("lapse", &name), Some(g));
        assert!(!is_generated("laps", &name));
        assert!(!is_generated("lapse", "lapse_alice"));
        assert!(!is_generated("lapse", &name.to_ascii_uppercase()));
        assert!(!is_generated("lapse", &format!("{name}0")));
        assert!(lapse_shaped(&name));
        assert!(lapse_shaped(&format!("old_prefix_{g}")));
        assert!(!lapse_shaped("default"));
        assert!(!lapse_shaped(&format!("Lapse_{g}")));
        assert!(!lapse_shaped(&format!("a b_{g}")));
    }

    #[test]
    fn every_admin_command_is_checked() {
        // `check_admin` has a probe for each (but dryrun, shown by being refused).
        let src = include_str!("mod.rs");
        for c in ADMIN_COMMANDS.iter().filter(|c| **c != "+acl|dryrun") {
            assert!(src.contains(&format!("\"{c}\" => vec![")), "{c}");
        }
        let docs = admin_rules("lapse:credentials").join(" ");
        assert!(
            src.contains(&format!("on >… {docs}\n")),
            "the module docs show {docs}"
        );
    }

    #[test]
    fn sha256_is_hex() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
