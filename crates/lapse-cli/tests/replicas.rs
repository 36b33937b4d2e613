#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Real `lapse serve` processes. Several on one PostgreSQL database, as a fleet
//! runs them behind a load balancer: any replica serves any request, one audit
//! chain, one revocation feed, one key ring, one DPoP replay cache, one sweeper. The
//! store is the machine's PostgreSQL, or a private PostgreSQL cluster this test
//! starts and stops itself when the database must go away. And one on the embedded
//! SQLite store, killed with SIGKILL in the middle of 1,000 issuances.

use lapse_core::{Clock, SystemClock};
use lapse_testkit::pg::PrivatePg;
use lapse_token::{DpopKey, Jwk, PublicKey};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");
const CI: &str = "spiffe://dev.lapse.local/ci/deploy";
/// The URL every replica answers to (the load balancer's): tokens' `iss` and the
/// URL DPoP proofs are signed for, whichever replica receives them.
const PUBLIC: &str = "http://lapse.replicas.test";

fn pg_admin_url() -> String {
    std::env::var("LAPSE_TEST_PG_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

async fn pg(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is needed at `{url}` (set LAPSE_TEST_PG_URL; .ci/run starts the local server): {e}")
        });
    tokio::spawn(conn);
    c
}

/// A database of its own, dropped afterwards.
struct Db {
    admin: String,
    name: String,
    url: String,
}

impl Db {
    async fn create(admin: &str, host: &str, port: u16) -> Self {
        let name = format!("lapse_replicas_{:08x}", rand::random::<u32>());
        pg(admin)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Self {
            admin: admin.to_owned(),
            url: format!("postgres://postgres@{host}:{port}/{name}"),
            name,
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

struct Replica {
    url: String,
    config: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    dir: PathBuf,
    admin: String,
    http: reqwest::Client,
    replicas: Vec<Replica>,
    /// `None`: the embedded SQLite store of the dev configuration.
    db: Option<Db>,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    /// `n` replicas of the dev configuration on a fresh database of the machine's
    /// PostgreSQL, sharing a key-encryption key (a file) and the public URL.
    async fn start(n: usize, extra: &str) -> Self {
        let db = Db::create(&pg_admin_url(), "127.0.0.1", 5432).await;
        Self::start_on(db, n, extra).await
    }

    /// One process on the dev configuration's embedded SQLite store.
    async fn embedded(extra: &str) -> Self {
        Self::start_with(None, 1, extra).await
    }

    async fn start_on(db: Db, n: usize, extra: &str) -> Self {
        Self::start_with(Some(db), n, extra).await
    }

    async fn start_with(db: Option<Db>, n: usize, extra: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let (_, cfg_path, admin) = lapse_server::dev::prepare(&dir, free_addr()).unwrap();
        let dir = dir.canonicalize().unwrap();
        let kek = dir.join("kek");
        std::fs::write(&kek, lapse_keyring::Kek::generate()).unwrap();
        let base = std::fs::read_to_string(&cfg_path).unwrap();
        let mut c = Self {
            dir,
            admin,
            http: lapse_identity::http_client(),
            replicas: Vec::new(),
            db,
            _tmp: tmp,
        };
        let keys = if c.db.is_some() {
            format!(
                "key_encryption_key = \"file:{}\"\nkey_refresh = \"1s\"\n",
                kek.display()
            )
        } else {
            String::new()
        };
        let shared = format!("public_url = \"{PUBLIC}\"\n{keys}sweep_interval = \"1s\"\n{extra}\n");
        for i in 0..n {
            let addr = free_addr();
            let toml: String = base
                .lines()
                .map(|l| {
                    if l.starts_with("listen = ") {
                        format!("listen = \"{addr}\"\n{shared}")
                    } else if let (true, Some(db)) = (l.starts_with("store = "), &c.db) {
                        format!("store = \"{}\"", db.url)
                    } else if c.db.is_some() && l.starts_with("signing_key = ") {
                        // With the ring in the store no key file is needed (the
                        // first replica seeds the ring with a new key).
                        String::new()
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            let config = c.dir.join(format!("replica-{i}.toml"));
            std::fs::write(&config, toml).unwrap();
            let replica = c.spawn(config, addr);
            c.replicas.push(replica);
        }
        for i in 0..n {
            c.wait_ready(i).await;
        }
        c
    }

    fn spawn(&self, config: PathBuf, addr: std::net::SocketAddr) -> Replica {
        let log = config.with_extension("log");
        let child = Command::new(LAPSE)
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Replica {
            url: format!("http://{addr}"),
            config,
            log,
            child,
        }
    }

    async fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = &mut self.replicas[i];
            if let Ok(Some(status)) = r.child.try_wait() {
                panic!(
                    "replica {i} exited ({status}): {}",
                    std::fs::read_to_string(&r.log).unwrap_or_default()
                );
            }
            let url = format!("{}/readyz", r.url);
            if let Ok(resp) = self.http.get(&url).send().await
                && resp.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts replica `i` again, on its config (after it was killed).
    async fn restart(&mut self, i: usize) {
        let config = self.replicas[i].config.clone();
        let addr: std::net::SocketAddr = self.replicas[i]
            .url
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let _ = self.replicas[i].child.wait();
        let replica = self.spawn(config, addr);
        self.replicas[i] = replica;
        self.wait_ready(i).await;
    }

    fn url(&self, i: usize) -> &str {
        &self.replicas[i].url
    }

    /// A token-exchange form and its proof, for sending to any replica.
    fn exchange_request(
        &self,
        key: &DpopKey,
        task: &str,
        extra: &[(&str, &str)],
    ) -> (Vec<(String, String)>, String) {
        let now = SystemClock.now().unix_seconds();
        let identity = lapse_server::dev::dev_token(&self.dir, CI, 600, &[], now).unwrap();
        let mut form: Vec<(String, String)> = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", identity.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-db"),
            ("scope", "read"),
            ("task", task),
            ("purpose", "replica test"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        form.dedup_by(|a, b| a.0 == b.0);
        let proof = key.proof("POST", &format!("{PUBLIC}/oauth/token"), None, now);
        (form, proof)
    }

    async fn send_exchange(
        &self,
        i: usize,
        form: &[(String, String)],
        proof: &str,
    ) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/oauth/token", self.url(i)))
            .header("DPoP", proof)
            .form(form)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Exchanges on replica `i`; the token endpoint's answer, which must be 200.
    async fn exchange(&self, i: usize, key: &DpopKey, task: &str) -> Value {
        let (form, proof) = self.exchange_request(key, task, &[]);
        let (status, v) = self.send_exchange(i, &form, &proof).await;
        assert_eq!(status, 200, "{v}");
        v
    }

    async fn admin_get(&self, i: usize, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.url(i)))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    async fn introspect(&self, i: usize, token: &str) -> Value {
        self.http
            .post(format!("{}/oauth/introspect", self.url(i)))
            .bearer_auth(&self.admin)
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn jwks(&self, i: usize) -> Vec<Jwk> {
        let v: Value = self
            .http
            .get(format!("{}/.well-known/jwks.json", self.url(i)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        serde_json::from_value(v["keys"].clone()).unwrap()
    }

    /// `lapse` with the replica's config; its exit status and standard output.
    fn cli(&self, i: usize, args: &[&str]) -> (bool, String) {
        let out = Command::new(LAPSE)
            .args(args)
            .arg("--config")
            .arg(&self.replicas[i].config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn audit_verifies(&self) {
        let (ok, out) = self.cli(0, &["audit", "verify"]);
        assert!(ok, "lapse audit verify: {out}");
        assert!(out.contains("audit chain verifies"), "{out}");
    }

    async fn leaders(&self) -> Vec<usize> {
        let mut v = Vec::new();
        for i in 0..self.replicas.len() {
            // A paused replica does not answer: it does not lead as far as anyone
            // can tell.
            if let Ok(resp) = self
                .http
                .get(format!("{}/readyz", self.url(i)))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                && let Ok(body) = resp.json::<Value>().await
                && body["leader"] == true
            {
                v.push(i);
            }
        }
        v
    }
}

/// The token's header `kid`, and its claims verified against `jwks` (real
/// Ed25519 verification).
fn verify_with(token: &str, jwks: &[Jwk]) -> (String, lapse_token::AccessClaims) {
    let header: Value = serde_json::from_slice(
        &lapse_token::b64::decode(token.split('.').next().unwrap()).unwrap(),
    )
    .unwrap();
    let kid = header["kid"].as_str().unwrap().to_owned();
    let keys: Vec<(String, PublicKey)> = jwks
        .iter()
        .map(|j| (j.kid.clone().unwrap(), PublicKey::from_jwk(j).unwrap()))
        .collect();
    let claims = lapse_token::access::verify(
        token,
        |k| keys.iter().find(|(kid, _)| kid == k).map(|(_, p)| p),
        PUBLIC,
        SystemClock.now().unix_seconds(),
    )
    .unwrap_or_else(|e| panic!("token does not verify against the JWKS: {e}"));
    (kid, claims)
}

fn kids(jwks: &[Jwk]) -> Vec<String> {
    let mut v: Vec<String> = jwks.iter().filter_map(|j| j.kid.clone()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_serves_any_request_on_one_chain_one_feed_one_key_ring() {
    let c = Cluster::start(3, "").await;
    let jwks = c.jwks(0).await;
    for i in 1..3 {
        assert_eq!(kids(&c.jwks(i).await), kids(&jwks), "one key ring");
    }
    // A gate's feed stream on replica 2, before anything ends.
    let mut feed = c
        .http
        .get(format!("{}/v1/feed", c.url(2)))
        .bearer_auth(&c.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);

    let key = DpopKey::generate();
    let issued = c.exchange(0, &key, "T-1").await;
    let token = issued["access_token"].as_str().unwrap().to_owned();
    let id = issued["grant_id"].as_str().unwrap().to_owned();
    verify_with(&token, &c.jwks(1).await);
    assert_eq!(c.introspect(1, &token).await["active"], true);

    // Renewed on replica 2 with the token and a proof for it.
    let now = SystemClock.now().unix_seconds();
    let path = format!("/v1/grants/{id}/renew");
    let renewed: Value = c
        .http
        .post(format!("{}{path}", c.url(2)))
        .header("Authorization", format!("DPoP {token}"))
        .header(
            "DPoP",
            key.proof("POST", &format!("{PUBLIC}{path}"), Some(&token), now),
        )
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token2 = renewed["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{renewed}"))
        .to_owned();
    assert_eq!(c.introspect(0, &token2).await["active"], true);

    // Revoked on replica 1: the stream on replica 2 says so, every replica agrees.
    let st = c
        .http
        .post(format!("{}/v1/grants/{id}/revoke", c.url(1)))
        .bearer_auth(&c.admin)
        .json(&json!({ "reason": "replica test" }))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 200);
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(&id) {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, feed.chunk())
            .await
            .unwrap_or_else(|_| panic!("the revocation never reached replica 2's feed: {seen}"))
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: grant.ended"), "{seen}");
    for i in 0..3 {
        assert_eq!(
            c.introspect(i, &token2).await["active"],
            false,
            "replica {i}"
        );
        let (st, g) = c.admin_get(i, &format!("/v1/grants/{id}")).await;
        assert_eq!((st, g["state"].as_str()), (200, Some("revoked")), "{g}");
    }
    let (_, g) = c.admin_get(0, &format!("/v1/grants/{id}")).await;
    let kinds: Vec<&str> = g["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "access.decided",
            "grant.issued",
            "renewal.decided",
            "grant.renewed",
            "grant.revoked"
        ],
        "one history across the replicas that wrote it"
    );
    let (st, report) = c.admin_get(2, "/v1/audit/verify").await;
    assert_eq!(st, 200, "{report}");
    c.audit_verifies();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dpop_proof_replayed_to_another_replica_is_refused() {
    let c = Cluster::start(2, "").await;
    let key = DpopKey::generate();
    let (form, proof) = c.exchange_request(&key, "T-replay", &[]);
    let (st, v) = c.send_exchange(0, &form, &proof).await;
    assert_eq!(st, 200, "{v}");
    for i in [1, 0] {
        let (st, v) = c.send_exchange(i, &form, &proof).await;
        assert_eq!(st, 400, "replica {i}: {v}");
        assert_eq!(v["error"], "invalid_dpop_proof", "{v}");
    }
    // Exactly one grant for the task.
    let (_, list) = c.admin_get(1, "/v1/grants?task=T-replay").await;
    assert_eq!(list["grants"].as_array().map(Vec::len), Some(1), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_burst_loses_nothing_and_another_takes_over_the_sweeper() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let c = Arc::new(Cluster::start(3, "").await);
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        let l = c.leaders().await;
        if l.len() == 1 {
            break l[0];
        }
        assert!(Instant::now() < deadline, "leaders: {l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pid = c.replicas[leader].child.id();
    const BURST: usize = 300;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..BURST {
        let (c, answered) = (c.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let key = DpopKey::generate();
            let (form, proof) = c.exchange_request(&key, &format!("T-burst-{n}"), &[]);
            let r = c
                .http
                .post(format!("{}/oauth/token", c.url(n % 3)))
                .header("DPoP", proof)
                .form(&form)
                .send()
                .await;
            answered.fetch_add(1, Ordering::SeqCst);
            match r {
                Ok(resp) => Some((resp.status().as_u16(), resp.json::<Value>().await.ok()?)),
                // The killed replica's connections.
                Err(_) => None,
            }
        }));
    }
    while answered.load(Ordering::SeqCst) < BURST / 5 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let killed_at = answered.load(Ordering::SeqCst);
    assert!(killed_at < BURST, "the kill came after the burst");
    let mut tokens = Vec::new();
    let mut lost = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some((200, v)) => tokens.push(v),
            Some((st, v)) => panic!("a surviving replica answered {st}: {v}"),
            None => lost += 1,
        }
    }
    assert!(
        tokens.len() >= BURST / 2,
        "{} tokens, {lost} lost",
        tokens.len()
    );
    let alive: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    every_token_and_grant_is_recorded(&c, alive[0], &tokens).await;
    c.audit_verifies();

    // Another replica takes the sweeper over, and it sweeps.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let l = c.leaders().await;
        if l.len() == 1 && l[0] != leader {
            break;
        }
        assert!(Instant::now() < deadline, "no replica took over: {l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = DpopKey::generate();
    let (form, proof) = c.exchange_request(&key, "T-short", &[("expires_in", "1")]);
    let (st, v) = c.send_exchange(alive[0], &form, &proof).await;
    assert_eq!(st, 200, "{v}");
    let id = v["grant_id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, g) = c.admin_get(alive[1], &format!("/v1/grants/{id}")).await;
        if g["state"] == "expired" {
            break;
        }
        assert!(Instant::now() < deadline, "never swept: {g}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// A leader frozen with SIGSTOP keeps its database session (its kernel still
/// answers keepalives) but stops renewing its lease: the other replica takes the
/// sweeper over within the lease and ends a short grant on time; woken with
/// SIGCONT, the old leader knows its term lapsed and does not lead again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_loses_the_lease_and_another_sweeps() {
    let c = Cluster::start(2, "leader_lease = \"2s\"").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        let l = c.leaders().await;
        if l.len() == 1 {
            break l[0];
        }
        assert!(Instant::now() < deadline, "leaders: {l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let other = 1 - leader;
    let key = DpopKey::generate();
    let (form, proof) = c.exchange_request(&key, "T-paused", &[("expires_in", "2")]);
    let (st, v) = c.send_exchange(other, &form, &proof).await;
    assert_eq!(st, 200, "{v}");
    let id = v["grant_id"].as_str().unwrap().to_owned();
    let pid = c.replicas[leader].child.id();
    signal(pid, "-STOP");
    let paused = Instant::now();
    // The lease (2 s) lapses and the other replica, asking five times a lease,
    // takes it: well within 2 s + one renewal period + slack.
    loop {
        if c.leaders().await == vec![other] {
            break;
        }
        assert!(
            paused.elapsed() < Duration::from_secs(5),
            "no takeover {:?} after the leader froze",
            paused.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took_over = paused.elapsed();
    loop {
        let (_, g) = c.admin_get(other, &format!("/v1/grants/{id}")).await;
        if g["state"] == "expired" {
            break;
        }
        assert!(
            paused.elapsed() < Duration::from_secs(8),
            "the 2 s grant was never swept while the leader was frozen: {g}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(pid, "-CONT");
    // Woken, it renews nothing (the lease is the other's) and acts on nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.leaders().await, vec![other], "after SIGCONT");
    let (_, g) = c.admin_get(leader, &format!("/v1/grants/{id}")).await;
    let ends: Vec<&Value> = g["audit"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "grant.expired")
        .collect();
    assert_eq!(ends.len(), 1, "expired once: {g}");
    c.audit_verifies();
    eprintln!("takeover after {took_over:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_while_replicas_serve() {
    let c = Cluster::start(2, "key_publish_delay = \"3s\"").await;
    let key = DpopKey::generate();
    let old = c.exchange(0, &key, "T-old").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (k1, _) = verify_with(&old, &c.jwks(1).await);

    let (ok, out) = c.cli(0, &["--json", "keys", "rotate"]);
    assert!(ok, "{out}");
    let rotation: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let k2 = rotation["new_kid"].as_str().unwrap().to_owned();
    assert_ne!(k1, k2);
    assert_eq!(rotation["previous"], k1.as_str());
    let activates = rotation["activates_at"].as_i64().unwrap();

    // Published on every replica (within `key_refresh`) before anything is signed
    // with it; new tokens use it once it is active.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = c.exchange(1, &key, "T-new").await;
        let token = v["access_token"].as_str().unwrap();
        let jwks0 = c.jwks(0).await;
        let (kid, _) = verify_with(token, &c.jwks(1).await);
        if kid == k2 {
            assert!(
                SystemClock.now().millis() >= activates,
                "signed before its time"
            );
            assert!(
                kids(&jwks0).contains(&k2),
                "signed before every replica published it"
            );
            break;
        }
        assert_eq!(kid, k1);
        assert!(Instant::now() < deadline, "the new key never signed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = c.exchange(0, &key, "T-new-0").await;
    assert_eq!(
        verify_with(v["access_token"].as_str().unwrap(), &c.jwks(0).await).0,
        k2
    );
    // The old token is honoured until it expires: its key is still published.
    for i in 0..2 {
        assert!(kids(&c.jwks(i).await).contains(&k1));
        assert_eq!(c.introspect(i, &old).await["active"], true, "replica {i}");
    }
    let (ok, out) = c.cli(1, &["keys", "list"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{k2}  signing")), "{out}");
    assert!(out.contains(&format!("{k1}  published, retiring")), "{out}");
    // The audit log records it and verifies across the key change.
    let (_, audit) = c.admin_get(0, "/v1/audit?limit=10000").await;
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "key.rotated"),
        "{audit}"
    );
    c.audit_verifies();
    // The private keys are not in the database in the clear.
    let db = pg(&c.db.as_ref().unwrap().url).await;
    for row in db
        .query("SELECT kid, sealed FROM signing_keys", &[])
        .await
        .unwrap()
    {
        let sealed: Vec<u8> = row.get(1);
        assert_eq!(sealed.len(), 12 + 32 + 16, "nonce, sealed secret, tag");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarts_under_load_and_lapse_fails_closed_then_recovers() {
    let server = PrivatePg::init();
    let db = Db::create(&server.admin_url(), "127.0.0.1", server.port).await;
    let c = Cluster::start_on(db, 1, "store_timeout = \"1s\"").await;
    let pid = c.replicas[0].child.id();
    let c = std::sync::Arc::new(c);
    // Load: one request after another, recording each answer.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = {
        let c = c.clone();
        tokio::spawn(async move {
            let key = DpopKey::generate();
            let mut answers: Vec<(Instant, u16, Value)> = Vec::new();
            let mut n = 0;
            while !*stop_rx.borrow() {
                n += 1;
                let (form, proof) = c.exchange_request(&key, &format!("T-load-{n}"), &[]);
                let (st, v) = c.send_exchange(0, &form, &proof).await;
                answers.push((Instant::now(), st, v));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let down_at = Instant::now();
    server.stop();
    // Down: not ready, and nothing is issued.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = c
            .http
            .get(format!("{}/readyz", c.url(0)))
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "readyz never said not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let up_at = Instant::now();
    server.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c
            .http
            .get(format!("{}/readyz", c.url(0)))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never recovered: {}",
            r.text().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send_replace(true);
    let answers = load.await.unwrap();
    // The same process served throughout.
    assert_eq!(c.replicas[0].child.id(), pid);
    let status_of = |t: Instant| answers.iter().filter(move |(at, _, _)| *at > t);
    let down: Vec<&(Instant, u16, Value)> = answers
        .iter()
        .filter(|(at, _, _)| *at > down_at + Duration::from_millis(200) && *at < up_at)
        .collect();
    assert!(!down.is_empty());
    for (_, st, v) in &down {
        assert_eq!(*st, 503, "while the database was down: {v}");
    }
    for (_, st, v) in &answers {
        assert!(
            *st == 200 || *st == 503,
            "only success or fail-closed: {st} {v}"
        );
    }
    assert!(
        status_of(up_at).any(|(_, st, _)| *st == 200),
        "no success after the database came back"
    );
    // Every token handed out has its grant and record.
    for (_, st, v) in &answers {
        if *st == 200 {
            let (st, g) = c
                .admin_get(
                    0,
                    &format!("/v1/grants/{}", v["grant_id"].as_str().unwrap()),
                )
                .await;
            assert_eq!(st, 200, "{g}");
            assert!(
                g["audit"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|e| e["kind"] == "grant.issued"))
            );
        }
    }
    c.audit_verifies();
}

/// Every token a client got has its grant and its issuance record, and every grant
/// has its records: nothing half-written, whatever was in flight when it died.
async fn every_token_and_grant_is_recorded(c: &Cluster, i: usize, tokens: &[Value]) {
    let jwks = c.jwks(i).await;
    for v in tokens {
        let (_, claims) = verify_with(v["access_token"].as_str().unwrap(), &jwks);
        let (st, g) = c
            .admin_get(i, &format!("/v1/grants/{}", claims.grant_id))
            .await;
        assert_eq!(st, 200, "{g}");
        assert_eq!(g["state"], "active", "{g}");
        let issued = g["audit"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "grant.issued")
            .unwrap_or_else(|| panic!("no grant.issued for {}", claims.grant_id));
        let data: Value = serde_json::from_str(issued["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["jti"].as_str(), Some(claims.jti.as_str()), "{data}");
    }
    let (_, list) = c.admin_get(i, "/v1/grants?limit=10000").await;
    let grants = list["grants"].as_array().unwrap();
    assert!(grants.len() >= tokens.len());
    for g in grants {
        let (_, full) = c
            .admin_get(i, &format!("/v1/grants/{}", g["id"].as_str().unwrap()))
            .await;
        let kinds: Vec<&str> = full["audit"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["access.decided", "grant.issued"],
            "a grant without its records, or half of them: {full}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_thousand_concurrent_issuances_loses_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const BURST: usize = 1_000;
    // One workload sends all 1,000 at once: its rate limit is not what is tested.
    let mut c = Cluster::embedded("limits = { token_per_workload = \"off\" }").await;
    let pid = c.replicas[0].child.id();
    let url = c.url(0).to_owned();
    let (http, dir) = (c.http.clone(), c.dir.clone());
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..BURST {
        let (http, dir, url, answered) = (http.clone(), dir.clone(), url.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let key = DpopKey::generate();
            let now = SystemClock.now().unix_seconds();
            let identity = lapse_server::dev::dev_token(&dir, CI, 600, &[], now).unwrap();
            let task = format!("T-crash-{n}");
            let form = [
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", identity.as_str()),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("audience", "orders-db"),
                ("scope", "read"),
                ("task", task.as_str()),
                ("purpose", "crash test"),
            ];
            let r = http
                .post(format!("{url}/oauth/token"))
                .header(
                    "DPoP",
                    key.proof("POST", &format!("{PUBLIC}/oauth/token"), None, now),
                )
                .form(&form)
                .send()
                .await;
            answered.fetch_add(1, Ordering::SeqCst);
            match r {
                Ok(resp) => Some((resp.status().as_u16(), resp.json::<Value>().await.ok()?)),
                Err(_) => None,
            }
        }));
    }
    while answered.load(Ordering::SeqCst) < BURST / 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let killed_at = answered.load(Ordering::SeqCst);
    let mut tokens = Vec::new();
    let mut lost = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some((200, v)) => tokens.push(v),
            Some((st, v)) => panic!("answered {st} before the kill: {v}"),
            None => lost += 1,
        }
    }
    assert!(
        killed_at < BURST && lost > 0,
        "the kill did not land mid-burst ({killed_at} answered, {lost} lost)"
    );
    assert!(tokens.len() >= BURST / 4, "{} tokens", tokens.len());

    c.restart(0).await;
    every_token_and_grant_is_recorded(&c, 0, &tokens).await;
    c.audit_verifies();
    // It serves on, on the same chain.
    let key = DpopKey::generate();
    c.exchange(0, &key, "T-after").await;
    c.audit_verifies();
}

/// Someone with write access to the database but not the key-encryption key
/// swaps a key's public part for their own, or keeps a retired key published:
/// the records no longer match their seals, and nothing accepts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_records_altered_in_the_database_are_refused() {
    let c = Cluster::start(1, "").await;
    let key = DpopKey::generate();
    let token = c.exchange(0, &key, "T-keys").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (kid, _) = verify_with(&token, &c.jwks(0).await);
    let db = pg(&c.db.as_ref().unwrap().url).await;
    // The attacker's own key, published under the ring's key id.
    let forged = lapse_token::SigningKey::generate();
    let mut jwk = forged.jwk().clone();
    jwk.kid = Some(kid.clone());
    db.execute(
        "UPDATE signing_keys SET public = $1 WHERE kid = $2",
        &[&serde_json::to_vec(&jwk).unwrap(), &kid],
    )
    .await
    .unwrap();
    let (ok, out) = c.cli(0, &["keys", "list"]);
    assert!(!ok, "an altered key record was accepted: {out}");
    assert!(out.contains("does not match the sealed key"), "{out}");
    // The running replica keeps the ring it had (reloads fail loudly) and still
    // publishes only the real key.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let published = c.jwks(0).await;
    assert_eq!(kids(&published), vec![kid.clone()]);
    assert_ne!(published[0], jwk);
    let log = std::fs::read_to_string(&c.replicas[0].log).unwrap();
    assert!(log.contains("key ring reload failed"), "{log}");

    // Restored, then a schedule edit (a retirement undone, or a key brought
    // forward) breaks the seal the same way.
    db.execute(
        "UPDATE signing_keys SET public = $1 WHERE kid = $2",
        &[&serde_json::to_vec(&c.jwks(0).await[0]).unwrap(), &kid],
    )
    .await
    .unwrap();
    assert!(c.cli(0, &["keys", "list"]).0);
    db.execute(
        "UPDATE signing_keys SET activates_at = activates_at - 1 WHERE kid = $1",
        &[&kid],
    )
    .await
    .unwrap();
    let (ok, out) = c.cli(0, &["keys", "list"]);
    assert!(!ok && out.contains("does not open"), "{out}");
}

/// A polling proof captured while the request waits cannot collect it later on
/// another replica: each poll spends its proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_poll_cannot_collect_an_approved_request_on_another_replica() {
    let c = Cluster::start(2, "").await;
    let key = DpopKey::generate();
    let (form, proof) = c.exchange_request(&key, "T-approve", &[("scope", "admin")]);
    let form: Vec<(String, String)> = form
        .into_iter()
        .filter(|(k, v)| k != "scope" || v == "admin")
        .collect();
    let (st, v) = c.send_exchange(0, &form, &proof).await;
    assert_eq!(
        (st, v["error"].as_str()),
        (400, Some("authorization_pending")),
        "{v}"
    );
    let id = v["request_id"].as_str().unwrap().to_owned();
    let now = SystemClock.now().unix_seconds();
    let poll_form = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("request_id", id.as_str()),
    ];
    let captured = key.proof("POST", &format!("{PUBLIC}/oauth/token"), None, now);
    let poll = |i: usize, proof: String| {
        c.http
            .post(format!("{}/oauth/token", c.url(i)))
            .header("DPoP", proof)
            .form(&poll_form)
            .send()
    };
    let r = poll(0, captured.clone()).await.unwrap();
    assert_eq!(r.status(), 400);
    let approver =
        std::fs::read_to_string(c.dir.join(lapse_server::dev::APPROVER_TOKEN_FILE)).unwrap();
    for token in [c.admin.as_str(), approver.trim()] {
        let st = c
            .http
            .post(format!("{}/v1/approvals/{id}/approve", c.url(1)))
            .bearer_auth(token)
            .json(&json!({ "reason": "CHG-1" }))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(st, 200);
    }
    let r = poll(1, captured).await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["error"], "invalid_dpop_proof",
        "the replayed poll collected: {v}"
    );
    let fresh = key.proof(
        "POST",
        &format!("{PUBLIC}/oauth/token"),
        None,
        SystemClock.now().unix_seconds(),
    );
    let v: Value = poll(1, fresh).await.unwrap().json().await.unwrap();
    assert!(v["access_token"].is_string(), "{v}");
}
