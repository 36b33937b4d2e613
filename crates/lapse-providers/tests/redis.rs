#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The Redis provider on its own, against a private `redis-server` each test
//! starts (see `support/redis_server.rs`): what a generated user can do, that
//! its password never reaches the server, and that destroying it ends its
//! connections. The admin user holds exactly the module docs' least privileges
//! ([`admin_rules`]), not `default`.

use lapse_core::{Clock, GrantId, SystemClock};
use lapse_providers::redis::{
    ADMIN_COMMANDS, PrivilegeConfig, RedisConfig, RedisProvider, acl, admin_rules,
};
use lapse_providers::registry::ProviderConfig;
use lapse_providers::{
    CredentialProvider, CredentialSpec, Handout, ProviderError, Secret, StrayKind,
};
use lapse_testkit::redis::RedisServer;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value, cmd};
use sha2::{Digest, Sha256};
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

const MARKER: &str = "lapse:credentials";
const ADMIN: &str = "lapse_admin";

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A connection that waits as long as a command takes (the busy XREAD).
async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(None);
    redis::Client::open(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

async fn run(c: &mut MultiplexedConnection, args: &[&str]) -> redis::RedisResult<Value> {
    let (name, rest) = args.split_first().unwrap();
    cmd(name).arg(rest).query_async(c).await
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".into(),
        Value::Nil => String::new(),
        other => format!("{other:?}"),
    }
}

/// Every string in a reply, nested ones too, separated by spaces.
fn flat(v: &Value) -> String {
    match v {
        Value::Array(a) | Value::Set(a) => a.iter().map(flat).collect::<Vec<_>>().join(" "),
        Value::Map(m) => m
            .iter()
            .map(|(k, v)| format!("{} {}", flat(k), flat(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => text(other),
    }
}

/// The server refused for want of permission.
fn assert_noperm(r: redis::RedisResult<Value>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected NOPERM, the server answered {v:?}"),
        Err(e) => assert_eq!(e.code(), Some("NOPERM"), "{what}: expected NOPERM, got {e}"),
    }
}

/// One test's server, its root connection and the least-privilege admin.
struct Target {
    server: RedisServer,
    root: MultiplexedConnection,
    files: Vec<std::path::PathBuf>,
}

impl Target {
    async fn new() -> Self {
        let server = RedisServer::start();
        let mut root = connect(&server.root_url()).await.unwrap();
        for args in [
            &["SET", "orders:items", "widget"][..],
            &["SET", "secrets:x", "hidden"],
            &["XADD", "orders:stream", "*", "a", "1"],
        ] {
            run(&mut root, args).await.unwrap();
        }
        let mut t = Self {
            server,
            root,
            files: Vec::new(),
        };
        t.make_admin(ADMIN, &admin_rules(MARKER)).await;
        t
    }

    fn admin_password(name: &str) -> String {
        format!("adm-{name}-pw")
    }

    async fn make_admin(&mut self, name: &str, rules: &[String]) {
        let pw = format!(">{}", Self::admin_password(name));
        let mut c = cmd("ACL");
        c.arg("SETUSER")
            .arg(name)
            .arg("reset")
            .arg("on")
            .arg(pw)
            .arg(rules);
        c.query_async::<Value>(&mut self.root)
            .await
            .unwrap_or_else(|e| panic!("make admin {name} {rules:?}: {e}"));
    }

    async fn root(&mut self, args: &[&str]) -> Value {
        run(&mut self.root, args)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn url_file(&mut self, admin: &str) -> String {
        let path =
            std::env::temp_dir().join(format!("lapse-redis-test-{}-{admin}.url", self.server.port));
        std::fs::write(
            &path,
            self.server.url_for(admin, &Self::admin_password(admin)),
        )
        .unwrap();
        self.files.push(path.clone());
        format!("file:{}", path.display())
    }

    fn config(&mut self, admin: &str) -> RedisConfig {
        RedisConfig {
            audience: "orders-cache".into(),
            admin_url: self.url_file(admin),
            user_prefix: "lapse".into(),
            public_host: None,
            public_port: None,
            marker_key: MARKER.into(),
            allow_all_keys: false,
            grants: vec![
                PrivilegeConfig {
                    action: "read".into(),
                    keys: vec!["orders:*".into()],
                    channels: vec!["orders.events".into()],
                    commands: vec!["+get".into(), "+mget".into(), "+xread".into()],
                },
                PrivilegeConfig {
                    action: "write".into(),
                    keys: vec!["orders:*".into()],
                    channels: vec![],
                    commands: vec!["+@write".into(), "-del".into()],
                },
            ],
        }
    }

    fn provider(&mut self) -> RedisProvider {
        RedisProvider::new(self.config(ADMIN)).unwrap()
    }

    async fn user_exists(&mut self, name: &str) -> bool {
        self.root(&["ACL", "GETUSER", name]).await != Value::Nil
    }

    async fn mark_of(&mut self, name: &str) -> Option<serde_json::Value> {
        let v = self.root(&["HGET", MARKER, name]).await;
        (v != Value::Nil).then(|| serde_json::from_str(&text(&v)).unwrap())
    }

    /// The `cmd=` of each connection of `user`.
    async fn commands_of(&mut self, user: &str) -> Vec<String> {
        let list = text(&self.root(&["CLIENT", "LIST"]).await);
        list.lines()
            .filter(|l| l.split(' ').any(|f| f == format!("user={user}")))
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("cmd=")))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

async fn issue(p: &RedisProvider, actions: &[&str]) -> (GrantId, Handout) {
    let grant = GrantId::generate();
    let spec = CredentialSpec {
        grant,
        name: p.name_for(grant),
        actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        valid_until: SystemClock.now().plus_secs(300),
    };
    let h = p
        .create(&spec, &Secret::generate())
        .await
        .unwrap_or_else(|e| panic!("create {actions:?}: {e}"));
    (grant, h)
}

fn handout_url(h: &Handout) -> String {
    format!(
        "redis://{}:{}@{}:{}",
        h.username, h.password, h.host, h.port
    )
}

async fn login(h: &Handout) -> MultiplexedConnection {
    connect(&handout_url(h))
        .await
        .unwrap_or_else(|e| panic!("log in as `{}`: {e}", h.username))
}

/// Reads what `MONITOR` shows on a raw connection until `until` appears (or 5 s).
fn monitor(port: u16, root_password: &str) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "AUTH {root_password}\r\nMONITOR\r\n").unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    // `+OK` of AUTH and of MONITOR.
    for _ in 0..2 {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("+OK"), "{line}");
    }
    std::thread::spawn(move || {
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            if tx.send(std::mem::take(&mut line)).is_err() {
                break;
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_does_what_its_actions_allow_and_dies_with_its_connections() {
    let mut t = Target::new().await;
    let p = t.provider();
    p.prepare().await.unwrap();
    p.prepare().await.expect("prepare is idempotent");
    t.root(&["CONFIG", "SET", "slowlog-log-slower-than", "0"])
        .await;
    let seen = monitor(t.server.port, &t.server.root_password);

    let (grant, h) = issue(&p, &["read"]).await;
    assert_eq!(h.kind, "redis");
    assert_eq!((h.host.as_str(), h.port), ("127.0.0.1", t.server.port));
    assert_eq!(h.dbname, "");
    assert_eq!(h.username, format!("lapse_{grant}"));
    assert!(lapse_core::Timestamp::parse_rfc3339(&h.valid_until).is_some());

    // The password reached the server as its SHA-256 only.
    let user = t.root(&["ACL", "GETUSER", &h.username]).await;
    let shown = flat(&user);
    assert!(shown.contains(&sha256_hex(&h.password)), "{shown}");
    assert!(!shown.contains(&h.password));
    let acl_list = flat(&t.root(&["ACL", "LIST"]).await);
    assert!(!acl_list.contains(&h.password));
    let slowlog = flat(&t.root(&["SLOWLOG", "GET", "1000"]).await);
    assert!(
        slowlog.contains("SETUSER"),
        "the slow log records every command"
    );
    assert!(!slowlog.contains(&h.password), "{slowlog}");
    // Redis leaves ACL commands out of MONITOR; what it shows (the mark, up to
    // a sentinel sent after the create) holds no password.
    t.root(&["ECHO", "monitor-sentinel"]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut monitored = String::new();
    while !monitored.contains("monitor-sentinel") && Instant::now() < deadline {
        if let Ok(l) = seen.recv_timeout(Duration::from_millis(100)) {
            monitored.push_str(&l);
        }
    }
    assert!(monitored.contains("monitor-sentinel"), "{monitored}");
    assert!(
        monitored.contains(&h.username),
        "the mark shows: {monitored}"
    );
    assert!(!monitored.contains(&h.password), "{monitored}");
    assert!(!monitored.contains(&sha256_hex(&h.password)), "{monitored}");

    // What `read` allows, and nothing else.
    let mut idle = login(&h).await;
    assert_eq!(
        text(&run(&mut idle, &["GET", "orders:items"]).await.unwrap()),
        "widget"
    );
    run(&mut idle, &["MGET", "orders:items", "orders:none"])
        .await
        .unwrap();
    assert_noperm(run(&mut idle, &["GET", "secrets:x"]).await, "another key");
    assert_noperm(
        run(&mut idle, &["SET", "orders:items", "x"]).await,
        "a write",
    );
    assert_noperm(run(&mut idle, &["FLUSHALL"]).await, "FLUSHALL");
    assert_noperm(run(&mut idle, &["KEYS", "*"]).await, "KEYS");
    assert_noperm(run(&mut idle, &["CONFIG", "GET", "*"]).await, "CONFIG");
    assert_noperm(run(&mut idle, &["ACL", "LIST"]).await, "ACL");
    assert_noperm(run(&mut idle, &["HGETALL", MARKER]).await, "the marker");
    assert_noperm(
        run(&mut idle, &["PUBLISH", "orders.events", "x"]).await,
        "PUBLISH",
    );

    // Listed as Lapse's, with its grant; the mark holds it.
    let listed = p.list().await.unwrap();
    let mine = listed.iter().find(|e| e.name == h.username).unwrap();
    assert_eq!(mine.grant, Some(grant));
    assert!(mine.can_login);
    assert_eq!(mine.valid_until, None, "Redis has no expiry");
    assert_eq!(mine.sessions, 1);
    let mark = t.mark_of(&h.username).await.unwrap();
    assert_eq!(mark["grant"], grant.to_string());
    assert_eq!(mark["audience"], "orders-cache");
    assert_eq!(mark["prefix"], "lapse");
    let later = SystemClock.now().plus_secs(900);
    p.extend(&h.username, later).await.unwrap();
    let mark = t.mark_of(&h.username).await.unwrap();
    assert_eq!(
        mark["valid_until"],
        later.unix_seconds(),
        "extend moves the mark"
    );

    // A second connection, busy in a blocking read.
    let mut busy = login(&h).await;
    let blocked = tokio::spawn(async move {
        let r = run(
            &mut busy,
            &["XREAD", "BLOCK", "30000", "STREAMS", "orders:stream", "$"],
        )
        .await;
        let next = run(&mut busy, &["GET", "orders:items"]).await;
        (r, next)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cmds = t.commands_of(&h.username).await;
        if cmds.len() == 2 && cmds.iter().any(|c| c == "xread") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both connections not seen: {cmds:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(p.sessions(&h.username).await.unwrap(), 2);

    let d = p.destroy(&h.username).await.unwrap();
    assert!(d.existed);
    assert_eq!(d.sessions_terminated, 2);
    assert_eq!(d.sessions_left, 0);

    // Both are dead: the blocked read ended (not after 30 s), the idle one's
    // next command fails; the user is gone and AUTH with its password refused.
    let (read, next) = tokio::time::timeout(Duration::from_secs(10), blocked)
        .await
        .expect("the killed XREAD ends within 10 s")
        .unwrap();
    assert!(read.is_err(), "the blocked read was cut: {read:?}");
    assert!(next.is_err(), "the busy connection still answers");
    assert!(
        run(&mut idle, &["GET", "orders:items"]).await.is_err(),
        "the idle connection still answers"
    );
    assert!(!t.user_exists(&h.username).await);
    assert_eq!(t.mark_of(&h.username).await, None);
    let refused = connect(&handout_url(&h)).await.expect_err("AUTH refused");
    assert!(
        refused.to_string().contains("WRONGPASS")
            || refused.kind() == redis::ErrorKind::AuthenticationFailed,
        "{refused}"
    );
    assert_eq!(p.sessions(&h.username).await.unwrap(), 0);
    assert!(p.list().await.unwrap().iter().all(|e| e.name != h.username));

    // Again: already gone is success.
    let again = p.destroy(&h.username).await.unwrap();
    assert!(!again.existed);
    assert_eq!((again.sessions_terminated, again.sessions_left), (0, 0));
    assert!(
        !t.user_exists(&h.username).await,
        "destroy never re-creates it"
    );
    assert!(matches!(
        p.extend(&h.username, SystemClock.now().plus_secs(600))
            .await,
        Err(ProviderError::Step { step: "extend", .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broad_categories_lose_their_dangerous_commands() {
    let mut t = Target::new().await;
    let p = t.provider();

    let (_, w) = issue(&p, &["write"]).await;
    let mut c = login(&w).await;
    run(&mut c, &["SET", "orders:new", "1"]).await.unwrap();
    run(&mut c, &["INCR", "orders:new"]).await.unwrap();
    assert_noperm(
        run(&mut c, &["DEL", "orders:new"]).await,
        "`-del` after `+@write`",
    );
    assert_noperm(
        run(&mut c, &["GET", "orders:new"]).await,
        "GET is not @write",
    );
    assert_noperm(run(&mut c, &["SET", "secrets:x", "1"]).await, "another key");
    // `+@write` holds these; the trailing rules take them back.
    assert_noperm(run(&mut c, &["FLUSHALL"]).await, "FLUSHALL");
    assert_noperm(run(&mut c, &["FLUSHDB"]).await, "FLUSHDB");
    assert_noperm(run(&mut c, &["SWAPDB", "0", "1"]).await, "SWAPDB");
    assert_noperm(
        run(
            &mut c,
            &[
                "FUNCTION",
                "LOAD",
                "#!lua name=x\nredis.register_function('f', function() return 1 end)",
            ],
        )
        .await,
        "FUNCTION LOAD",
    );
    assert_noperm(run(&mut c, &["EVAL", "return 1", "0"]).await, "EVAL");
    assert_eq!(
        text(&t.root(&["GET", "secrets:x"]).await),
        "hidden",
        "nothing was flushed"
    );

    // Two actions: the rules of both, in one user.
    let (_, rw) = issue(&p, &["read", "write"]).await;
    let mut both = login(&rw).await;
    run(&mut both, &["GET", "orders:items"]).await.unwrap();
    run(&mut both, &["SET", "orders:other", "x"]).await.unwrap();

    // An action without rules: the user logs in and can do nothing.
    assert_eq!(p.unmapped(&["read", "nothing"]), vec!["nothing".to_owned()]);
    let (_, n) = issue(&p, &["nothing"]).await;
    let mut none = login(&n).await;
    assert_noperm(run(&mut none, &["GET", "orders:items"]).await, "no rules");

    drop((c, both, none));
    for h in [&w, &rw, &n] {
        assert!(p.destroy(&h.username).await.unwrap().existed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alikes_are_strays_and_never_listed() {
    let mut t = Target::new().await;
    let p = t.provider();
    let (_, ours) = issue(&p, &["read"]).await;
    assert!(p.strays().await.unwrap().is_empty());

    let look_alike = p.name_for(GrantId::generate());
    let disabled = p.name_for(GrantId::generate());
    let other_table = p.name_for(GrantId::generate());
    t.root(&[
        "ACL",
        "SETUSER",
        &look_alike,
        "on",
        ">x",
        "~orders:*",
        "+get",
    ])
    .await;
    t.root(&["ACL", "SETUSER", &disabled, "off"]).await;
    t.root(&["ACL", "SETUSER", &other_table, "on", ">x"]).await;
    // Not shaped like a generated name: outside Lapse's namespace.
    t.root(&["ACL", "SETUSER", "lapse_alice", "on", ">x"]).await;
    // Marked by a Lapse table of another audience with this prefix: not a
    // stray, and not this table's to list.
    let other = serde_json::json!({"grant": "gr_0", "audience": "elsewhere", "prefix": "lapse", "valid_until": 0});
    t.root(&["HSET", MARKER, &other_table, &other.to_string()])
        .await;
    let mut alive = login(&Handout {
        username: look_alike.clone(),
        password: "x".into(),
        ..ours.clone()
    })
    .await;
    run(&mut alive, &["GET", "orders:items"]).await.unwrap();

    let strays = p.strays().await.unwrap();
    let found: Vec<(&str, StrayKind, bool, i64)> = strays
        .iter()
        .map(|s| (s.name.as_str(), s.kind, s.can_login, s.sessions))
        .collect();
    let mut expected = vec![
        (look_alike.as_str(), StrayKind::LookAlike, true, 1),
        (disabled.as_str(), StrayKind::LookAlike, false, 0),
    ];
    expected.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(found, expected, "{strays:?}");
    let listed = p.list().await.unwrap();
    let names: Vec<&str> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        vec![ours.username.as_str()],
        "only what Lapse marked"
    );

    // Marks without a user: those whose grant is long over go at `list`; a
    // fresh one (a create in flight) stays.
    let past = p.name_for(GrantId::generate());
    let fresh = p.name_for(GrantId::generate());
    let mark = |until: i64| {
        serde_json::json!({"grant": "gr_0", "audience": "orders-cache", "prefix": "lapse", "valid_until": until}).to_string()
    };
    let now = SystemClock.now().unix_seconds();
    t.root(&["HSET", MARKER, &past, &mark(now - 3600)]).await;
    t.root(&["HSET", MARKER, &fresh, &mark(now + 300)]).await;
    p.list().await.unwrap();
    assert_eq!(t.mark_of(&past).await, None);
    assert!(t.mark_of(&fresh).await.is_some());
    assert!(
        t.mark_of(&other_table).await.is_some(),
        "another table's mark stays"
    );
    // `destroy` of a mark without a user removes the mark, and creates nothing.
    let d = p.destroy(&fresh).await.unwrap();
    assert!(!d.existed);
    assert_eq!(t.mark_of(&fresh).await, None);
    assert!(!t.user_exists(&fresh).await);

    p.destroy(&ours.username).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_names_what_the_admin_lacks() {
    let mut t = Target::new().await;
    let (_, earlier) = issue(&t.provider(), &["read"]).await;
    let mut session = login(&earlier).await;
    // Each documented permission is needed: without any one, prepare says which.
    for missing in ADMIN_COMMANDS {
        let rules: Vec<String> = admin_rules(MARKER)
            .into_iter()
            .filter(|r| r != missing)
            .collect();
        let admin = format!(
            "lapse_adm_no_{}",
            missing.trim_start_matches('+').replace('|', "_")
        );
        t.make_admin(&admin, &rules).await;
        let p = RedisProvider::new(t.config(&admin)).unwrap();
        let e = p.prepare().await.expect_err(missing);
        let m = e.to_string();
        assert!(
            matches!(&e, ProviderError::Unfit { target, .. } if target == "orders-cache"),
            "{missing}: {m}"
        );
        assert!(
            m.contains(&format!("`{missing}")),
            "`{missing}` not named in: {m}"
        );
        assert!(!m.contains("-pw"), "no password in: {m}");
        // A credential cannot be made without it either.
        let grant = GrantId::generate();
        let spec = CredentialSpec {
            grant,
            name: p.name_for(grant),
            actions: vec!["read".into()],
            valid_until: SystemClock.now().plus_secs(60),
        };
        assert!(p.create(&spec, &Secret::generate()).await.is_err());
        assert!(!t.user_exists(&spec.name).await);
        if *missing == "+acl|dryrun" {
            // Revocation does not wait on setup: this admin cannot prepare, but it
            // can end a user (and its connection) the other one made.
            let d = p.destroy(&earlier.username).await.unwrap();
            assert!(d.existed);
            assert_eq!(d.sessions_terminated, 1);
            assert!(run(&mut session, &["GET", "orders:items"]).await.is_err());
            assert!(!t.user_exists(&earlier.username).await);
        }
    }
    // The marker key is part of it.
    let rules: Vec<String> = admin_rules(MARKER)
        .into_iter()
        .map(|r| {
            if r.starts_with('~') {
                "~other".into()
            } else {
                r
            }
        })
        .collect();
    t.make_admin("lapse_adm_nokey", &rules).await;
    let p = RedisProvider::new(t.config("lapse_adm_nokey")).unwrap();
    let e = p.prepare().await.unwrap_err();
    assert!(matches!(e, ProviderError::Unfit { .. }), "{e}");
    assert!(
        e.to_string().contains("`+hset on ~lapse:credentials`"),
        "{e}"
    );

    // Privileges the target does not have: a command it does not know, and one
    // it counts as dangerous that Lapse's own list misses.
    for (command, expect) in [("+nosuchcmd", "does not have"), ("+info", "@dangerous")] {
        let mut cfg = t.config(ADMIN);
        cfg.grants[0].commands.push(command.into());
        let p = RedisProvider::new(cfg).unwrap();
        let e = p.prepare().await.unwrap_err();
        assert!(matches!(e, ProviderError::Unfit { .. }), "{e}");
        let m = e.to_string();
        assert!(
            m.contains(expect) && m.contains(command.trim_start_matches('+')),
            "{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_never_reach_a_command() {
    let mut t = Target::new().await;
    let p = t.provider();
    let users_before = t.root(&["ACL", "USERS"]).await;
    // Names are one argument each: nothing to find, nothing made, no error.
    let long = "x".repeat(10 * 1024);
    for name in [
        "x on nopass ~* +@all",
        "x\r\nFLUSHALL\r\n",
        "a\0b",
        "\"; FLUSHALL; \"",
        long.as_str(),
        // Not Lapse's: never disabled, deleted or disconnected.
        "default",
        ADMIN,
    ] {
        let d = p.destroy(name).await.unwrap();
        assert!(!d.existed, "{name:?}");
        assert_eq!(d.sessions_terminated, 0);
        assert!(p.extend(name, SystemClock.now()).await.is_err());
    }
    assert_eq!(
        p.sessions("default").await.unwrap(),
        1,
        "the root connection lives"
    );
    let flags = flat(&t.root(&["ACL", "GETUSER", "default"]).await);
    assert!(
        flags.starts_with("flags on "),
        "default is still on: {flags}"
    );
    assert_eq!(t.root(&["ACL", "USERS"]).await, users_before);
    assert_eq!(text(&t.root(&["GET", "secrets:x"]).await), "hidden");
    // `create` takes only the name Lapse gives the grant.
    let grant = GrantId::generate();
    for name in [
        "x on nopass ~* +@all".to_owned(),
        "default".to_owned(),
        p.name_for(GrantId::generate()),
    ] {
        let spec = CredentialSpec {
            grant,
            name: name.clone(),
            actions: vec!["read".into()],
            valid_until: SystemClock.now().plus_secs(60),
        };
        let e = p.create(&spec, &Secret::generate()).await.unwrap_err();
        assert!(matches!(e, ProviderError::Config(_)), "{e}");
    }
    assert_eq!(t.root(&["ACL", "USERS"]).await, users_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_connection_fails_fast_and_recovers() {
    let mut t = Target::new().await;
    let p = t.provider();
    p.prepare().await.unwrap();
    // Cut off (disabled, its connection killed): unavailable, without the password.
    t.root(&["ACL", "SETUSER", ADMIN, "off"]).await;
    t.root(&["CLIENT", "KILL", "USER", ADMIN]).await;
    let e = p.list().await.unwrap_err();
    let e = if matches!(e, ProviderError::Unavailable { .. }) {
        e
    } else {
        // The first command may only find the connection dead.
        p.list().await.unwrap_err()
    };
    assert!(matches!(e, ProviderError::Unavailable { .. }), "{e}");
    assert!(!e.to_string().contains("-pw"), "{e}");
    let e = p.list().await.unwrap_err();
    assert!(matches!(e, ProviderError::Unavailable { .. }), "{e}");
    // Back on: the next command reconnects.
    t.root(&["ACL", "SETUSER", ADMIN, "on"]).await;
    p.list()
        .await
        .expect("the provider recovers once the admin is back");

    // Nothing listening: built fine (lazily), fails fast.
    let mut cfg = t.config(ADMIN);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let path = std::env::temp_dir().join(format!("lapse-redis-dead-{port}.url"));
    std::fs::write(&path, format!("redis://{ADMIN}:s3cret@127.0.0.1:{port}")).unwrap();
    t.files.push(path.clone());
    cfg.admin_url = format!("file:{}", path.display());
    let p = RedisProvider::new(cfg).unwrap();
    let start = Instant::now();
    let e = p.prepare().await.unwrap_err();
    assert!(matches!(e, ProviderError::Unavailable { .. }), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(11),
        "{:?}",
        start.elapsed()
    );
    assert!(!e.to_string().contains("s3cret"), "{e}");
}

/// Lapse's glob matcher and the server's agree (`KEYS` uses the same rules as
/// ACL key patterns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_glob_matcher_agrees_with_the_server() {
    let mut t = Target::new().await;
    let keys = [
        MARKER,
        "a-",
        "a]b",
        "a\\b",
        "a*b",
        "x",
        "lapse:credentials:x",
        "[x]",
        "^x",
    ];
    for k in keys {
        t.root(&["SET", k, "1"]).await;
    }
    let patterns = [
        "*",
        "lapse:*",
        "l?pse:*",
        "[l]apse:*",
        "[^l]apse:*",
        "[a-m]apse:*",
        "[m-a]apse:*",
        "\\lapse:*",
        "lapse\\:credentials",
        "lapse:credentials[",
        "[]lapse:*",
        "a[b-]",
        "a[\\]]b",
        "a\\\\b",
        "a\\*b",
        "a*b",
        "*s",
        "*:*",
        "[[]x]",
        "[\\^]x",
        "[^",
        "\\",
        "a[",
        "*[",
        "?",
        "??",
        "[a-]",
        "lapse:credentials*",
        "**lapse**",
        "*a*b*",
    ];
    for p in patterns {
        let found: Vec<String> = acl_keys(&mut t, p).await;
        for k in keys {
            assert_eq!(
                acl::glob_match(p.as_bytes(), k.as_bytes()),
                found.iter().any(|f| f == k),
                "pattern {p:?} on key {k:?} (server found {found:?})"
            );
        }
    }
}

async fn acl_keys(t: &mut Target, pattern: &str) -> Vec<String> {
    match t.root(&["KEYS", pattern]).await {
        Value::Array(a) => a.iter().map(text).collect(),
        other => panic!("{other:?}"),
    }
}

fn config() -> RedisConfig {
    RedisConfig {
        audience: "orders-cache".into(),
        admin_url: "env:LAPSE_REDIS_ADMIN_URL".into(),
        user_prefix: "lapse".into(),
        public_host: None,
        public_port: None,
        marker_key: MARKER.into(),
        allow_all_keys: false,
        grants: vec![PrivilegeConfig {
            action: "read".into(),
            keys: vec!["orders:*".into()],
            channels: vec![],
            commands: vec!["+get".into()],
        }],
    }
}

fn refused(change: impl FnOnce(&mut RedisConfig), key: &str) {
    let mut c = config();
    change(&mut c);
    let e = c.validate().expect_err(key);
    assert!(e.contains(key), "`{key}` not named in: {e}");
    assert!(
        e.len() < 300,
        "the error echoes too much: {} bytes",
        e.len()
    );
    assert!(!e.contains('\0'));
}

#[test]
fn validate_refuses_hostile_rules_and_everything_patterns() {
    config().validate().unwrap();
    let long = "x".repeat(10 * 1024);
    for bad in ["a'b", "a;b", "a b", "a\0b", "A", "1a", "", long.as_str()] {
        refused(|c| c.user_prefix = bad.into(), "user_prefix");
    }
    // Hostile strings in every rule part.
    for bad in [
        "a b",
        "a\0b",
        "a\nb",
        "a\tb",
        "",
        long.as_str(),
        "~*",
        "%RW~x",
    ] {
        refused(|c| c.grants[0].keys = vec![bad.into()], "keys");
        refused(|c| c.grants[0].channels = vec![bad.into()], "channels");
    }
    for bad in [
        "+get get",
        "+get\0",
        "'+get'",
        "+get;",
        "\"+get\"",
        "+a'b",
        long.as_str(),
        "get",
        "allkeys",
        "allcommands",
        "nopass",
        ">pw",
        "<pw",
        "#00",
        "on",
        "reset",
        "~*",
        "&*",
        "+@all",
        "+@admin",
        "+@dangerous",
        "+@scripting",
        "+@nosuch",
        "+acl",
        "+acl|setuser",
        "+config",
        "+config|get",
        "+module",
        "+debug",
        "+shutdown",
        "+flushall",
        "+flushdb",
        "+client",
        "+client|kill",
        "+replicaof",
        "+slaveof",
        "+save",
        "+bgsave",
        "+monitor",
        "+script",
        "+eval",
        "+evalsha",
        "+function",
        "+fcall",
        "+keys",
        "+migrate",
        "+FLUSHALL",
    ] {
        refused(|c| c.grants[0].commands = vec![bad.into()], "commands");
    }
    refused(|c| c.grants[0].commands.clear(), "commands");
    // Everything, and the marker key.
    for everything in ["*", "**", "?*", "*?*"] {
        refused(
            |c| c.grants[0].keys = vec![everything.into()],
            "allow_all_keys",
        );
        refused(
            |c| c.grants[0].channels = vec![everything.into()],
            "allow_all_keys",
        );
    }
    for marker in [
        "lapse:*",
        "lapse:credentials",
        "l?pse:*",
        "*:credentials",
        "[k-m]apse:*",
        "lapse\\:*",
    ] {
        refused(|c| c.grants[0].keys = vec![marker.into()], "marker_key");
    }
    let mut c = config();
    c.allow_all_keys = true;
    c.grants[0].keys = vec!["*".into()];
    c.validate().unwrap();
    c.grants[0].keys = vec!["lapse:*".into()];
    assert!(
        c.validate().unwrap_err().contains("marker_key"),
        "still its own"
    );
    let mut c = config();
    c.marker_key = "my:marks".into();
    c.grants[0].keys = vec!["lapse:*".into()];
    c.validate().unwrap();
    for bad in ["a b", "a*", "", "m[1]"] {
        refused(|c| c.marker_key = bad.into(), "marker_key");
    }
    refused(|c| c.grants.clear(), "[[redis.grant]]");
    refused(
        |c| c.admin_url = "redis://root:pw@localhost:6379".into(),
        "admin_url",
    );
    refused(|c| c.public_host = Some("a b".into()), "public_host");
    refused(
        |c| {
            c.grants[0].keys.clear();
            c.grants[0].channels.clear();
        },
        "keys",
    );

    // Hostile but harmless inside one argument: fine.
    let mut c = config();
    c.grants[0].keys = vec!["orders:{'\";--}:*".into()];
    c.grants[0].commands = vec!["+get".into(), "-@dangerous".into(), "+json.get".into()];
    c.validate().unwrap();
}

#[test]
fn the_admin_url_is_never_quoted_back() {
    let mut c = config();
    let path = std::env::temp_dir().join(format!("lapse-redis-url-{}", rand::random::<u32>()));
    for (url, expect) in [
        ("not a url with s3cret", "redis://"),
        ("postgres://u:s3cret@h/db", "redis://"),
        ("rediss://u:s3cret@h:6380/#insecure", "#insecure"),
        ("redis+unix:///tmp/s3cret.sock", "redis://"),
        ("redis://u:s3cret@[::1", "does not parse"),
    ] {
        std::fs::write(&path, url).unwrap();
        c.admin_url = format!("file:{}", path.display());
        let e = RedisProvider::new(c.clone()).err().unwrap().to_string();
        assert!(e.contains(expect), "`{expect}` not in: {e}");
        assert!(!e.contains("s3cret"), "{e}");
    }
    std::fs::write(&path, "rediss://lapse_admin:s3cret@cache.internal:6380").unwrap();
    let p = RedisProvider::new(c.clone()).unwrap();
    assert_eq!(p.kind(), "redis");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn the_table_in_lapse_toml() {
    #[derive(serde::Deserialize)]
    struct File {
        redis: Vec<RedisConfig>,
    }
    let f: File = toml::from_str(
        r#"
        [[redis]]
        audience = "orders-cache"
        admin_url = "env:LAPSE_REDIS_ADMIN_URL"
        public_host = "cache.internal"
        public_port = 6379

        [[redis.grant]]
        action = "read"
        keys = ["orders:*"]
        channels = ["orders.events"]
        commands = ["+get", "+mget", "+xread", "+subscribe"]

        [[redis.grant]]
        action = "write"
        keys = ["orders:*"]
        commands = ["+@write", "-del"]
        "#,
    )
    .unwrap();
    let c = &f.redis[0];
    c.validate().unwrap();
    assert_eq!(c.user_prefix, "lapse");
    assert_eq!(c.marker_key, "lapse:credentials");
    assert!(!c.allow_all_keys);
    let table = ProviderConfig::Redis(c.clone());
    assert_eq!((table.kind(), table.audience()), ("redis", "orders-cache"));
    let e = toml::from_str::<File>(
        "[[redis]]\naudience = \"a\"\nadmin_url = \"env:X\"\nuser_prefx = \"x\"\n",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("user_prefx"), "the unknown key is named: {e}");
}
