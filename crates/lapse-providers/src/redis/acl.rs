//! The ACL rules a `[[redis.grant]]` may hand out, checked without a server, and
//! Redis' own glob matcher (to tell whether a key pattern reaches Lapse's marker).
//!
//! Every rule Lapse sends is one protocol argument of `ACL SETUSER` built here
//! from a checked part: a key pattern becomes `~pattern`, a channel pattern
//! `&pattern`, a command rule is sent as written (lower-cased). Nothing typed in
//! a request reaches a rule; user names come from grant ids only.

/// Longest key or channel pattern accepted.
pub const MAX_PATTERN_BYTES: usize = 512;
/// Most patterns (keys plus channels) or command rules in one grant entry.
pub const MAX_RULES: usize = 64;
/// Longest command or category name accepted.
const MAX_NAME_CHARS: usize = 64;

/// The ACL categories of Redis 7 (`ACL CAT`). A category outside this list is
/// refused at load: Redis would refuse it at the first `ACL SETUSER` instead.
pub const CATEGORIES: &[&str] = &[
    "keyspace",
    "read",
    "write",
    "set",
    "sortedset",
    "list",
    "hash",
    "string",
    "bitmap",
    "hyperloglog",
    "geo",
    "stream",
    "pubsub",
    "admin",
    "fast",
    "slow",
    "blocking",
    "dangerous",
    "connection",
    "transaction",
    "scripting",
];

/// Categories a grant may never add. `@admin` and `@dangerous` are Redis' own
/// words for commands that reach beyond a key pattern (`FLUSHALL`, `KEYS`,
/// `MIGRATE`, `DEBUG`, `CONFIG`, replication, …). `@scripting` is refused too:
/// a script runs with the caller's ACL (so it reaches no other key), but it can
/// hold the whole server in one long call, which `CLIENT KILL` does not end, so
/// a revocation could not end it and every other client would wait; and
/// `FUNCTION LOAD` leaves code behind that outlives the credential.
pub const FORBIDDEN_CATEGORIES: &[&str] = &["all", "admin", "dangerous", "scripting"];

/// Added after a grant's own command rules, always: categories such as `@write`
/// or `@keyspace` contain `FLUSHALL`, `FLUSHDB`, `SWAPDB`, `MIGRATE`,
/// `FUNCTION LOAD`, … (measured with `ACL DRYRUN` on Redis 7.0: a user with
/// `~orders:* +@write` may run `FLUSHALL`, which no key pattern limits), and
/// rules apply left to right, so these last rules take them out again.
pub const TRAILING_RULES: &[&str] = &["-@admin", "-@dangerous", "-@scripting"];

/// Commands a grant may never add by name, whatever the subcommand: the
/// administrative and dangerous ones (Redis 7 puts each in `@admin`,
/// `@dangerous` or `@scripting`; `prepare` also asks the server for the
/// categories of every command a grant names, so one missing here is still
/// refused at start).
pub const FORBIDDEN_COMMANDS: &[&str] = &[
    "acl",
    "bgrewriteaof",
    "bgsave",
    "client",
    "cluster",
    "config",
    "debug",
    "eval",
    "eval_ro",
    "evalsha",
    "evalsha_ro",
    "failover",
    "fcall",
    "fcall_ro",
    "flushall",
    "flushdb",
    "function",
    "keys",
    "lastsave",
    "latency",
    "migrate",
    "module",
    "monitor",
    "pfdebug",
    "pfselftest",
    "psync",
    "replconf",
    "replicaof",
    "restore",
    "restore-asking",
    "save",
    "script",
    "shutdown",
    "slaveof",
    "slowlog",
    "sort",
    "sort_ro",
    "swapdb",
    "sync",
];

/// Why a rule part is refused; the caller names the field and the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError(pub String);

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(m: impl Into<String>) -> RuleError {
    RuleError(m.into())
}

/// Refuses what no rule part may hold: nothing, too much, whitespace, control
/// characters and NUL (a rule is one protocol argument; these are never part of
/// a sensible one and would make logs and `ACL LIST` ambiguous).
fn plain(s: &str, max: usize) -> Result<(), RuleError> {
    if s.is_empty() {
        return Err(err("is empty"));
    }
    if s.len() > max {
        return Err(err(format!("is longer than {max} bytes")));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(err("holds whitespace or a control character"));
    }
    Ok(())
}

/// Whether `pattern` matches every key (but the shortest): only `*` and `?`,
/// with at least one `*` (`*`, `**`, `?*`, …).
pub fn matches_everything(pattern: &str) -> bool {
    pattern.contains('*') && pattern.chars().all(|c| c == '*' || c == '?')
}

/// A key or channel pattern as written in `lapse.toml` (without the `~` or `&`
/// Lapse adds).
pub fn pattern(p: &str) -> Result<(), RuleError> {
    plain(p, MAX_PATTERN_BYTES)?;
    if p.starts_with(['~', '%', '&']) {
        return Err(err(
            "starts with `~`, `%` or `&`: write the pattern alone, Lapse adds the ACL prefix",
        ));
    }
    Ok(())
}

/// One command rule: `+name`, `+name|sub`, `+@category`, or the same with `-`.
/// `+` rules naming a forbidden command or category are refused; `-` rules only
/// take away, so any well-formed one is fine.
pub fn command(rule: &str) -> Result<(), RuleError> {
    plain(rule, MAX_NAME_CHARS * 2 + 2)?;
    let (adds, body) = match rule.split_at_checked(1) {
        Some(("+", b)) => (true, b),
        Some(("-", b)) => (false, b),
        _ => {
            return Err(err(
                "must be `+name`, `+name|subcommand`, `+@category` or the same with `-` (no `allcommands`, `allkeys`, `nopass`, `on`, `>`, `<`, `#`, …)",
            ));
        }
    };
    let body = body.to_ascii_lowercase();
    if let Some(category) = body.strip_prefix('@') {
        if !CATEGORIES.contains(&category) && category != "all" {
            return Err(err(format!(
                "`@{category}` is not an ACL category of Redis"
            )));
        }
        if adds && FORBIDDEN_CATEGORIES.contains(&category) {
            return Err(err(format!(
                "`+@{category}` is never granted (administrative, dangerous or scripting commands)"
            )));
        }
        return Ok(());
    }
    let (name, sub) = match body.split_once('|') {
        Some((n, s)) => (n, Some(s)),
        None => (body.as_str(), None),
    };
    let word = |w: &str| {
        !w.is_empty()
            && w.len() <= MAX_NAME_CHARS
            && w.starts_with(|c: char| c.is_ascii_lowercase())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c))
    };
    if !word(name) || !sub.is_none_or(word) {
        return Err(err(
            "must be `+name`, `+name|subcommand` or `+@category` with names of [a-z0-9_.-]",
        ));
    }
    if adds && FORBIDDEN_COMMANDS.contains(&name) {
        return Err(err(format!(
            "`+{name}` is never granted (administrative, dangerous or scripting)"
        )));
    }
    Ok(())
}

/// The arguments of the one `ACL SETUSER` that makes a credential, after the
/// user name: a fresh user (`reset`), enabled, with the password's SHA-256 (so
/// the password is not in the command), only `keys` and `channels`, no command
/// but `commands`, and [`TRAILING_RULES`] last. Each rule is its own argument.
pub fn setuser_rules(
    password_sha256_hex: &str,
    keys: &[&str],
    channels: &[&str],
    commands: &[&str],
) -> Vec<String> {
    let mut rules = vec![
        "reset".to_owned(),
        "on".to_owned(),
        format!("#{password_sha256_hex}"),
        "resetchannels".to_owned(),
    ];
    rules.extend(keys.iter().map(|k| format!("~{k}")));
    rules.extend(channels.iter().map(|c| format!("&{c}")));
    rules.push("-@all".to_owned());
    rules.extend(commands.iter().map(|c| c.to_ascii_lowercase()));
    rules.extend(TRAILING_RULES.iter().map(|r| (*r).to_owned()));
    rules
}

/// Redis' glob match (`stringmatchlen` in `util.c`, case-sensitive), which it
/// uses for ACL key patterns, `KEYS` and `SCAN MATCH`: `*` any run, `?` one
/// byte, `[abc]`, `[^abc]`, `[a-z]` classes, `\` escaping the next byte (also
/// inside a class); an unclosed `[` takes the rest of the pattern as its class.
/// As in Redis, a pattern never matches the empty string (the marker key is
/// never empty).
pub fn glob_match(pattern: &[u8], string: &[u8]) -> bool {
    let mut give_up = false;
    glob(pattern, string, &mut give_up, 0)
}

/// One step of [`glob_match`]. `give_up` is Redis' `skipLongerMatches`: once the
/// rest after a `*` matched nowhere in the string, an earlier `*` taking more
/// cannot help, which bounds the work to polynomial time.
fn glob(mut p: &[u8], mut s: &[u8], give_up: &mut bool, depth: u32) -> bool {
    // As Redis: a bound on recursion for abusive patterns.
    if depth > 1000 {
        return false;
    }
    while let (Some(&pc), Some(&sc)) = (p.first(), s.first()) {
        match pc {
            b'*' => {
                while p.get(1) == Some(&b'*') {
                    p = rest(p);
                }
                if p.len() == 1 {
                    return true;
                }
                let after = rest(p);
                while !s.is_empty() {
                    if glob(after, s, give_up, depth + 1) {
                        return true;
                    }
                    if *give_up {
                        return false;
                    }
                    s = rest(s);
                }
                *give_up = true;
                return false;
            }
            b'?' => {
                p = rest(p);
            }
            b'[' => {
                let (hit, after) = class(rest(p), sc);
                if !hit {
                    return false;
                }
                p = after;
            }
            b'\\' if p.len() >= 2 => {
                if p.get(1) != Some(&sc) {
                    return false;
                }
                p = p.get(2..).unwrap_or_default();
            }
            literal => {
                if literal != sc {
                    return false;
                }
                p = rest(p);
            }
        }
        s = rest(s);
        if s.is_empty() {
            while p.first() == Some(&b'*') {
                p = rest(p);
            }
            break;
        }
    }
    p.is_empty() && s.is_empty()
}

/// A class after its `[`: whether `c` is in it, and the pattern after its `]`
/// (nothing when it is not closed).
fn class(mut p: &[u8], c: u8) -> (bool, &[u8]) {
    let negated = p.first() == Some(&b'^');
    if negated {
        p = rest(p);
    }
    let mut hit = false;
    loop {
        match p {
            [b'\\', escaped, ..] => {
                hit |= *escaped == c;
                p = p.get(2..).unwrap_or_default();
            }
            [b']', after @ ..] => {
                p = after;
                break;
            }
            [] => break,
            [start, b'-', end, after @ ..] => {
                let (lo, hi) = if start <= end {
                    (*start, *end)
                } else {
                    (*end, *start)
                };
                hit |= (lo..=hi).contains(&c);
                p = after;
            }
            [one, after @ ..] => {
                hit |= *one == c;
                p = after;
            }
        }
    }
    (hit != negated, p)
}

fn rest(s: &[u8]) -> &[u8] {
    s.get(1..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        glob_match(p.as_bytes(), s.as_bytes())
    }

    #[test]
    fn globs_match_as_redis_does() {
        let marker = "lapse:credentials";
        for p in [
            "*",
            "**",
            "lapse:*",
            "lapse:cred*",
            "l?pse:*",
            "*credentials",
            "[l]apse:credentials",
            "[a-z]apse:credentials",
            "[z-a]apse:credentials",
            "[^x]apse:credentials",
            "\\lapse:credentials",
            "lapse\\:credentials",
            "lapse:credentials*",
            "lapse:credentials**",
            "*:*",
            "lapse:credentials[",
        ] {
            // The last one: an unclosed class takes the rest as its class and
            // needs one more byte, so it does not match.
            let expect = p != "lapse:credentials[";
            assert_eq!(m(p, marker), expect, "{p}");
        }
        for p in [
            "orders:*",
            "lapse:credential",
            "lapse:credentials?",
            "[^l]apse:credentials",
            "lapse\\*",
            "LAPSE:*",
            "[]lapse:credentials",
        ] {
            assert!(!m(p, marker), "{p}");
        }
        assert!(m("a[\\]]b", "a]b"));
        // `b-]` is a range from `]` to `b`, and the class is left unclosed
        // (Redis' `KEYS a[b-]` does not find `a-` either).
        assert!(!m("a[b-]", "a-"));
        assert!(!m("*", ""), "Redis: no pattern matches the empty string");
        // Polynomial, not exponential, on a hostile pattern.
        let hostile = "*a".repeat(200);
        let t = std::time::Instant::now();
        assert!(!m(&hostile, &"a".repeat(150)));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn command_rules() {
        for ok in [
            "+get",
            "+@read",
            "-keys",
            "-@dangerous",
            "+xread",
            "+config|get-x",
            "+json.get",
            "-flushall",
            "-@all",
            "+GET",
        ] {
            let allowed = !ok.starts_with("+config");
            assert_eq!(command(ok).is_ok(), allowed, "{ok}: {:?}", command(ok));
        }
        for bad in [
            "+@all",
            "+@admin",
            "+@dangerous",
            "+@scripting",
            "+@nosuch",
            "allcommands",
            "allkeys",
            "nopass",
            ">pw",
            "<pw",
            "#abc",
            "on",
            "+acl",
            "+acl|whoami",
            "+client|setname",
            "+flushall",
            "+eval",
            "+get get",
            "+get\0",
            "+",
            "+|x",
            "+get|",
            "+a;b",
            "+'x'",
        ] {
            assert!(command(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        assert!(matches_everything("*"));
        assert!(matches_everything("***"));
        assert!(matches_everything("?*"));
        assert!(!matches_everything("??"));
        assert!(!matches_everything("a*"));
        for bad in ["", "a b", "a\0", "a\n", "~*", "%R~x", "&x"] {
            assert!(pattern(bad).is_err(), "{bad:?}");
        }
        assert!(pattern(&"x".repeat(MAX_PATTERN_BYTES + 1)).is_err());
        assert!(pattern("orders:{1}:[a-z]*").is_ok());
    }

    #[test]
    fn one_argument_per_rule() {
        let r = setuser_rules("ab", &["orders:*"], &["news"], &["+GET", "-keys"]);
        assert_eq!(
            r,
            [
                "reset",
                "on",
                "#ab",
                "resetchannels",
                "~orders:*",
                "&news",
                "-@all",
                "+get",
                "-keys",
                "-@admin",
                "-@dangerous",
                "-@scripting"
            ]
        );
    }
}
