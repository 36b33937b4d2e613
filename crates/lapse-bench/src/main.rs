//! `lapse-bench`: the numbers in BENCHMARKS.md.
//!
//! Every figure is measured against the real thing: the decision bench calls
//! `PolicyBundle::decide` on a 100-policy set; the HTTP benches start the real
//! server on loopback with a durable SQLite store (WAL, `synchronous=FULL`) on the
//! machine's disk and drive it with real identity tokens and real DPoP proofs.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use lapse_bench::http::{Conn, form_value, post_form};
use lapse_bench::{policies, stats};
use lapse_core::{Clock, SystemClock};
use lapse_policy::PolicyBundle;
use lapse_token::{DpopKey, SigningKey};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "lapse-bench", about = "Lapse benchmarks (run with --release)")]
struct Cli {
    /// Print one JSON object per result instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One policy decision on a 100-policy set, indexed and unindexed.
    Decide {
        #[arg(long, default_value_t = 200_000)]
        iterations: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// End-to-end RFC 8693 token exchange with DPoP over loopback HTTP.
    Exchange(LoadArgs),
    /// RFC 7662 introspection of live tokens over loopback HTTP.
    Introspect(LoadArgs),
    /// A credential provider through the broker: grants/s, issue-to-usable
    /// (exchange + login + first command), revoke-to-sessions-gone with two
    /// sessions (one busy). Needs the target's admin URL: LAPSE_BENCH_PG_URL
    /// (default the local server as `postgres`), LAPSE_BENCH_MYSQL_URL (default
    /// `mysql://root@127.0.0.1:3306/test`), LAPSE_BENCH_REDIS_URL (default
    /// `redis://127.0.0.1:6379`, a user that may create ACL users).
    Provider {
        #[arg(long, value_enum)]
        target: providers::Target,
        #[arg(long, default_value_t = 300)]
        samples: usize,
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// PostgreSQL: PBKDF2 iterations of the SCRAM verifiers (the provider's default if unset).
        #[arg(long, default_value_t = lapse_providers::postgres::scram::DEFAULT_ITERATIONS)]
        scram_iterations: u32,
    },
    /// A `lapse serve --dev` process held at a fixed rate of exchanges for a long
    /// time: resident memory, errors, latency per minute (needs the release `lapse`
    /// binary beside this one).
    Soak {
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Unmeasured seconds first, so that the start is measured in steady
        /// state: the DPoP replay window (65 s) full, and the first grants already
        /// expiring (longer than `--ttl`).
        #[arg(long, default_value_t = 90)]
        warmup: u64,
        /// Seconds each grant asks for (`expires_in`): the sweeper ends as many
        /// grants a second as are issued once one TTL has passed.
        #[arg(long, default_value_t = 60)]
        ttl: u64,
    },
    /// What `lapse mcp-proxy` adds to a tool call over stdio (open-loop at `rate`),
    /// and sub-agent token exchange latency (needs the release `lapse` binary beside
    /// this one).
    Mcp {
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long, default_value_t = 2000)]
        exchanges: usize,
    },
    /// A stdio MCP server that answers every call at once (used by `mcp`).
    #[command(hide = true)]
    McpUpstream,
    /// Start-up latency `lapse run` adds to a command (needs the release `lapse`
    /// binary beside this one).
    Run {
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// The approver console with many requests waiting: server time to render the
    /// pending list (first and a deep page), and how soon an approval reaches a
    /// workload polling the way `lapse request --wait` does.
    Console {
        /// Pending requests in the store.
        #[arg(long, default_value_t = 10_000)]
        pending: usize,
        /// Page loads measured per page.
        #[arg(long, default_value_t = 300)]
        samples: usize,
        /// Approvals timed from the final approval to the workload holding its token.
        #[arg(long, default_value_t = 60)]
        approvals: usize,
    },
    /// The gate: in-process decisions per core, revocation propagation to 10 gates,
    /// latency added through a real nginx at a fixed rate.
    Gate {
        #[command(subcommand)]
        cmd: GateCmd,
    },
    /// fsync latency of the disk the store lives on, for context.
    Fsync {
        #[arg(long, default_value_t = 300)]
        iterations: usize,
    },
}

#[derive(Subcommand)]
enum GateCmd {
    /// `Gate::decide` on one thread.
    Decide {
        #[arg(long, default_value_t = 100_000)]
        requests: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Grants whose requests take turns (1: one workload's requests back to back).
        #[arg(long, default_value_t = 1)]
        tokens: usize,
        /// Decisions in flight on the one thread, as a server with that many
        /// requests open has (1: one after another, called directly). Above 1,
        /// their DPoP signatures are checked in batches.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
    },
    /// Revoke sent → every following gate refuses.
    Propagation {
        #[arg(long, default_value_t = 10)]
        gates: usize,
        #[arg(long, default_value_t = 300)]
        samples: usize,
        /// Two broker replicas on PostgreSQL: revokes go to one, the gates follow
        /// the other (the feed crosses replicas through the database).
        #[arg(long)]
        across_replicas: bool,
    },
    /// p99 through nginx with and without the gate at a fixed rate.
    Nginx {
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        /// Seconds of load on each server per run.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Each run alternates plain and gated this many times.
        #[arg(long, default_value_t = 10)]
        slices: usize,
    },
}

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// Concurrent keep-alive connections, each sending its next request when the
    /// previous one is answered.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured requests per run.
    #[arg(long, default_value_t = 40_000)]
    requests: usize,
    /// Unmeasured requests before each run.
    #[arg(long, default_value_t = 4_000)]
    warmup: usize,
    /// Distinct workloads (identity tokens); each is reused across its requests as a
    /// real workload reuses its token.
    #[arg(long, default_value_t = 1_000)]
    workloads: usize,
    /// Give every exchange a never-seen identity token (no verified-token cache hits).
    #[arg(long)]
    fresh_identity: bool,
    /// Runs, each against a fresh server and store; the report gives their median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where the store lives (a temporary folder under this path). Defaults to the
    /// system temp folder; it must be a real disk for the durability to be real.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The store: the embedded SQLite file, or a fresh database on the PostgreSQL
    /// at `LAPSE_BENCH_PG_URL` (default the local server as `postgres`).
    #[arg(long, value_enum, default_value = "sqlite")]
    store: StoreKind,
    /// Broker replicas sharing the store (PostgreSQL only); connection `c` goes to
    /// replica `c % replicas`. Each replica has its own two-worker runtime.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq)]
enum StoreKind {
    Sqlite,
    Postgres,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with `cargo run --release -p lapse-bench`");
    }
    match cli.cmd {
        Cmd::Decide { iterations, runs } => decide(iterations, runs, cli.json),
        Cmd::Exchange(a) => load(Kind::Exchange, &a, cli.json),
        Cmd::Introspect(a) => load(Kind::Introspect, &a, cli.json),
        Cmd::Fsync { iterations } => fsync(iterations, cli.json),
        Cmd::Run { samples } => runcmd::run(samples, cli.json),
        Cmd::Mcp {
            rate,
            seconds,
            exchanges,
        } => mcp::run(rate, seconds, exchanges, cli.json),
        Cmd::McpUpstream => mcp::upstream(),
        Cmd::Soak {
            rate,
            minutes,
            warmup,
            ttl,
        } => soak::run(rate, minutes, warmup, ttl, cli.json),
        Cmd::Gate { cmd } => match cmd {
            GateCmd::Decide {
                requests,
                runs,
                tokens,
                concurrency,
            } => gate::decide(requests, runs, tokens, concurrency, cli.json),
            GateCmd::Propagation {
                gates,
                samples,
                across_replicas,
            } => gate::propagation(gates, samples, across_replicas, cli.json),
            GateCmd::Nginx {
                rate,
                seconds,
                runs,
                slices,
            } => gate::through_nginx(rate, seconds, runs, slices, cli.json),
        },
        Cmd::Console {
            pending,
            samples,
            approvals,
        } => console::run(pending, samples, approvals, cli.json),
        Cmd::Provider {
            target,
            samples,
            requests,
            concurrency,
            scram_iterations,
        } => providers::run(
            target,
            samples,
            requests,
            concurrency,
            scram_iterations,
            cli.json,
        ),
    }
}

fn emit(json_out: bool, text: String, value: Value) {
    if json_out {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

// ---------------------------------------------------------------------------------
// decide

fn decide(iterations: usize, runs: usize, json_out: bool) -> anyhow::Result<()> {
    let files = policies::sources();
    let indexed = PolicyBundle::from_sources(&files)?;
    let flat = PolicyBundle::from_sources_unindexed(&files)?;
    if indexed.policy_count != 100 {
        bail!(
            "the synthetic set has {} policies, not 100",
            indexed.policy_count
        );
    }
    let requests = policies::requests(10_000, 7);
    // Same decisions both ways, or the comparison means nothing.
    let mut outcomes = std::collections::BTreeMap::<&'static str, usize>::new();
    for r in &requests {
        let a = indexed.decide(r);
        if a != flat.decide(r) {
            bail!("indexed and unindexed decisions differ for {r:?}");
        }
        *outcomes.entry(a.outcome_label()).or_default() += 1;
    }
    let mix: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    emit(
        json_out,
        format!(
            "decision mix over {} requests: {}",
            requests.len(),
            mix.join(", ")
        ),
        json!({ "bench": "decide.mix", "outcomes": outcomes }),
    );
    let mut medians = (Vec::new(), Vec::new());
    let mut p99s = (Vec::new(), Vec::new());
    for run in 0..runs {
        for (label, bundle) in [("indexed", &indexed), ("unindexed", &flat)] {
            let mut h = stats::histogram()?;
            // Warm caches and the branch predictor on a first pass.
            for r in requests.iter().take(2_000) {
                std::hint::black_box(bundle.decide(r));
            }
            for r in requests.iter().cycle().take(iterations) {
                let t = Instant::now();
                let d = bundle.decide(std::hint::black_box(r));
                stats::record(&mut h, t.elapsed());
                std::hint::black_box(d);
            }
            let s = stats::summary(&h);
            if label == "indexed" {
                medians.0.push(s.median_ns as f64);
                p99s.0.push(s.p99_ns as f64);
            } else {
                medians.1.push(s.median_ns as f64);
                p99s.1.push(s.p99_ns as f64);
            }
            emit(
                json_out,
                format!("decide {label:9} run {run}: {}", s.line()),
                json!({ "bench": "decide", "set": label, "run": run, "latency": s.json() }),
            );
        }
    }
    let (mi, mf) = (stats::median_f64(medians.0), stats::median_f64(medians.1));
    let (pi, pf) = (stats::median_f64(p99s.0), stats::median_f64(p99s.1));
    emit(
        json_out,
        format!(
            "decide, median of {runs} runs: indexed median {} p99 {}; unindexed median {} p99 {}; unindexed/indexed = {:.1}x (median), {:.1}x (p99)",
            stats::fmt_ns(mi as u64),
            stats::fmt_ns(pi as u64),
            stats::fmt_ns(mf as u64),
            stats::fmt_ns(pf as u64),
            mf / mi.max(1.0),
            pf / pi.max(1.0)
        ),
        json!({ "bench": "decide.summary", "runs": runs, "indexed": { "median_ns": mi, "p99_ns": pi }, "unindexed": { "median_ns": mf, "p99_ns": pf } }),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// fsync

fn fsync(iterations: usize, json_out: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let mut f = std::fs::File::create(dir.path().join("f"))?;
    let block = [7u8; 4096];
    let mut h = stats::histogram()?;
    for _ in 0..iterations {
        f.write_all(&block)?;
        let t = Instant::now();
        f.sync_data()?;
        stats::record(&mut h, t.elapsed());
    }
    let s = stats::summary(&h);
    emit(
        json_out,
        format!("fsync (4 KiB append + fdatasync): {}", s.line()),
        json!({ "bench": "fsync", "latency": s.json() }),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// exchange / introspect over loopback HTTP

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Exchange,
    Introspect,
}

mod console;
mod devserver;
mod gate;
mod mcp;
mod pg;
mod providers;
mod runcmd;
mod soak;

struct Server {
    addr: SocketAddr,
    /// The URL clients sign DPoP proofs for (the broker's `public_url`).
    public: String,
    dir: PathBuf,
    admin: String,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// The real broker in dev configuration, on its own two-worker runtime (the
    /// machine has two cores), with its store on disk.
    fn start(parent: Option<&PathBuf>) -> anyhow::Result<Self> {
        Self::start_with(parent, |_, _| Ok(()))
    }

    fn start_with(
        parent: Option<&PathBuf>,
        adjust: impl FnOnce(&mut lapse_broker::config::Config, &std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let tmp = match parent {
            Some(p) => tempfile::tempdir_in(p)?,
            None => tempfile::tempdir()?,
        };
        let dir = tmp.path().join("data");
        let mut server = Self::start_in(dir, adjust)?;
        server._tmp = Some(tmp);
        Ok(server)
    }

    /// `replicas` brokers on one fresh PostgreSQL database, sharing a key ring (the
    /// key-encryption key in a file) and a public URL.
    fn start_replicas(
        parent: Option<&PathBuf>,
        replicas: usize,
        store: &str,
    ) -> anyhow::Result<Vec<Self>> {
        let public = format!("http://lapse-bench.invalid:{}", rand::random::<u16>());
        let shared = |cfg: &mut lapse_broker::config::Config, dir: &std::path::Path| {
            let kek = dir.join("kek");
            if !kek.exists() {
                std::fs::write(&kek, lapse_keyring::Kek::generate())?;
            }
            cfg.store = store.to_owned();
            cfg.key_encryption_key = Some(format!("file:{}", kek.display()));
            cfg.public_url = Some(public.clone());
            anyhow::Ok(())
        };
        let first = Self::start_with(parent, shared)?;
        let dir = first.dir.clone();
        let mut all = vec![first];
        for _ in 1..replicas {
            all.push(Self::start_in(dir.clone(), shared)?);
        }
        Ok(all)
    }

    fn start_in(
        dir: PathBuf,
        adjust: impl FnOnce(&mut lapse_broker::config::Config, &std::path::Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (addr, public, admin, stop) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let (mut cfg, _, admin) = lapse_server::dev::prepare(&dir, addr)?;
            adjust(&mut cfg, &dir)?;
            let public = cfg.public_url();
            let lapse = lapse_server::build(cfg, Arc::new(SystemClock)).await?;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                let _ = lapse_server::serve(lapse, listener, async {
                    let _ = rx.await;
                })
                .await;
            });
            anyhow::Ok((addr, public, admin, tx))
        })?;
        Ok(Self {
            addr,
            public,
            dir,
            admin,
            runtime,
            stop: Some(stop),
            _tmp: None,
        })
    }

    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.runtime.shutdown_timeout(Duration::from_secs(5));
    }
}

/// Identity tokens from the dev issuer, signed here with its key (loaded once).
fn identity_tokens(dir: &std::path::Path, n: usize, now: i64) -> anyhow::Result<Vec<String>> {
    let key = SigningKey::load(&dir.join(lapse_server::dev::DEV_ISSUER_KEY))?;
    (0..n)
        .map(|i| {
            let jti: [u8; 12] = rand::random();
            let claims = json!({
                "iss": lapse_server::dev::DEV_ISSUER,
                "sub": format!("spiffe://dev.lapse.local/ci/job-{i}"),
                "aud": lapse_server::dev::DEV_AUDIENCE,
                "iat": now, "nbf": now, "exp": now + 600,
                "jti": lapse_token::b64::encode(jti),
                "repository": "acme/shop",
            });
            key.sign_jwt("JWT", &claims)
                .context("signing an identity token")
        })
        .collect()
}

/// Token-exchange requests, each with its own fresh DPoP proof from its
/// connection's key.
fn exchange_requests(
    server: &Server,
    keys: &[DpopKey],
    identities: &[String],
    n: usize,
    now: i64,
) -> Vec<Vec<u8>> {
    exchange_requests_for(server, keys, identities, n, now, "read")
}

/// As [`exchange_requests`], asking for `scope` on `orders-db`.
fn exchange_requests_for(
    server: &Server,
    keys: &[DpopKey],
    identities: &[String],
    n: usize,
    now: i64,
    scope: &str,
) -> Vec<Vec<u8>> {
    let host = server.addr.to_string();
    let htu = format!("{}/oauth/token", server.public);
    (0..n)
        .map(|k| {
            let key = keys.get(k % keys.len().max(1));
            let identity = identities
                .get(k % identities.len().max(1))
                .map_or("", String::as_str);
            let proof = key.map_or_else(String::new, |key| key.proof("POST", &htu, None, now));
            let body = format!(
                "grant_type={}&subject_token={}&subject_token_type={}&audience=orders-db&scope={scope}&task=T-{k}&purpose=benchmark",
                form_value("urn:ietf:params:oauth:grant-type:token-exchange"),
                form_value(identity),
                form_value("urn:ietf:params:oauth:token-type:jwt"),
            );
            post_form(&host, "/oauth/token", &[("DPoP", &proof)], &body)
        })
        .collect()
}

fn introspect_requests(server: &Server, tokens: &[String], n: usize) -> Vec<Vec<u8>> {
    let host = server.addr.to_string();
    let auth = format!("Bearer {}", server.admin);
    (0..n)
        .map(|k| {
            let token = tokens
                .get(k % tokens.len().max(1))
                .map_or("", String::as_str);
            post_form(
                &host,
                "/oauth/introspect",
                &[("Authorization", &auth)],
                &format!("token={}", form_value(token)),
            )
        })
        .collect()
}

struct RunResult {
    throughput: f64,
    latency: Histogram<u64>,
    /// Response bodies of the exchanges (for their tokens), when asked for.
    bodies: Vec<Vec<u8>>,
}

/// Sends `requests` over `concurrency` connections, each connection taking every
/// `concurrency`-th request in turn. Any answer other than 200 (or, for
/// introspection, anything but an active token) fails the run: a benchmark of
/// errors is no benchmark.
fn drive(
    addr: SocketAddr,
    requests: Vec<Vec<u8>>,
    concurrency: usize,
    kind: Kind,
    keep_bodies: bool,
) -> anyhow::Result<RunResult> {
    drive_spread(&[addr], requests, concurrency, kind, keep_bodies)
}

/// As [`drive`], connection `c` to `addrs[c % addrs.len()]`.
fn drive_spread(
    addrs: &[SocketAddr],
    requests: Vec<Vec<u8>>,
    concurrency: usize,
    kind: Kind,
    keep_bodies: bool,
) -> anyhow::Result<RunResult> {
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let n = requests.len();
    let requests = Arc::new(requests);
    client.block_on(async move {
        let mut conns = Vec::with_capacity(concurrency);
        for c in 0..concurrency {
            let addr = addrs
                .get(c % addrs.len().max(1))
                .copied()
                .context("no server address")?;
            conns.push(Conn::connect(addr).await?);
        }
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (c, mut conn) in conns.into_iter().enumerate() {
            let requests = requests.clone();
            tasks.push(tokio::spawn(async move {
                let mut h = stats::histogram()?;
                let mut bodies = Vec::new();
                for req in requests.iter().skip(c).step_by(concurrency) {
                    let t = Instant::now();
                    let resp = conn.send(req).await?;
                    stats::record(&mut h, t.elapsed());
                    let ok = resp.status == 200
                        && (kind == Kind::Exchange || resp.body.starts_with(b"{\"active\":true"));
                    if !ok {
                        bail!(
                            "HTTP {}: {}",
                            resp.status,
                            String::from_utf8_lossy(&resp.body)
                        );
                    }
                    if keep_bodies {
                        bodies.push(resp.body);
                    }
                }
                anyhow::Ok((h, bodies))
            }));
        }
        let mut latency = stats::histogram()?;
        let mut bodies = Vec::new();
        for t in tasks {
            let (h, b) = t.await??;
            latency.add(&h)?;
            bodies.extend(b);
        }
        let elapsed = start.elapsed();
        Ok(RunResult {
            throughput: n as f64 / elapsed.as_secs_f64(),
            latency,
            bodies,
        })
    })
}

fn load(kind: Kind, a: &LoadArgs, json_out: bool) -> anyhow::Result<()> {
    let name = match kind {
        Kind::Exchange if a.fresh_identity => "exchange (fresh identity token each)".to_owned(),
        Kind::Exchange if a.store == StoreKind::Postgres => {
            format!("exchange (postgres, {} replica(s))", a.replicas.max(1))
        }
        Kind::Exchange => "exchange".to_owned(),
        Kind::Introspect => "introspect".to_owned(),
    };
    let mut throughputs = Vec::new();
    let mut medians = Vec::new();
    let mut p99s = Vec::new();
    if a.replicas > 1 && a.store == StoreKind::Sqlite {
        bail!("--replicas needs --store postgres");
    }
    for run in 0..a.runs {
        let pg = match a.store {
            StoreKind::Postgres => Some(pg::Database::create()?),
            StoreKind::Sqlite => None,
        };
        let mut servers = match &pg {
            Some(db) => Server::start_replicas(a.dir.as_ref(), a.replicas.max(1), &db.url)?,
            None => vec![Server::start(a.dir.as_ref())?],
        };
        let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        let server = servers.remove(0);
        let now = SystemClock.now().unix_seconds();
        let keys: Vec<DpopKey> = (0..a.concurrency).map(|_| DpopKey::generate()).collect();
        let total = a.warmup + a.requests;
        let result = match kind {
            Kind::Exchange => {
                let identities = identity_tokens(
                    &server.dir,
                    if a.fresh_identity { total } else { a.workloads },
                    now,
                )?;
                let mut reqs = exchange_requests(&server, &keys, &identities, total, now);
                let measured = reqs.split_off(a.warmup.min(reqs.len()));
                drive_spread(&addrs, reqs, a.concurrency, kind, false)?;
                drive_spread(&addrs, measured, a.concurrency, kind, false)?
            }
            Kind::Introspect => {
                // Issue one live token per workload first, then introspect them.
                let identities = identity_tokens(&server.dir, a.workloads, now)?;
                let reqs = exchange_requests(&server, &keys, &identities, a.workloads, now);
                let issued = drive(server.addr, reqs, a.concurrency, Kind::Exchange, true)?;
                let tokens: Vec<String> = issued
                    .bodies
                    .iter()
                    .filter_map(|b| serde_json::from_slice::<Value>(b).ok())
                    .filter_map(|v| v.get("access_token")?.as_str().map(str::to_owned))
                    .collect();
                if tokens.len() != a.workloads {
                    bail!("expected {} tokens, got {}", a.workloads, tokens.len());
                }
                let mut reqs = introspect_requests(&server, &tokens, total);
                let measured = reqs.split_off(a.warmup.min(reqs.len()));
                drive(server.addr, reqs, a.concurrency, kind, false)?;
                drive(server.addr, measured, a.concurrency, kind, false)?
            }
        };
        server.stop();
        for s in servers {
            s.stop();
        }
        drop(pg);
        let s = stats::summary(&result.latency);
        throughputs.push(result.throughput);
        medians.push(s.median_ns as f64);
        p99s.push(s.p99_ns as f64);
        emit(
            json_out,
            format!(
                "{name} c={} run {run}: {:.0}/s, {}",
                a.concurrency,
                result.throughput,
                s.line()
            ),
            json!({ "bench": name, "concurrency": a.concurrency, "run": run, "per_sec": result.throughput, "latency": s.json() }),
        );
    }
    let lo = throughputs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = throughputs.iter().copied().fold(0.0, f64::max);
    let t = stats::median_f64(throughputs);
    let m = stats::median_f64(medians);
    let p = stats::median_f64(p99s);
    emit(
        json_out,
        format!(
            "{name} c={}, median of {} runs: {t:.0}/s (runs {lo:.0}..{hi:.0}), median latency {}, p99 {}",
            a.concurrency,
            a.runs,
            stats::fmt_ns(m as u64),
            stats::fmt_ns(p as u64)
        ),
        json!({ "bench": format!("{name}.summary"), "concurrency": a.concurrency, "runs": a.runs, "per_sec": t, "median_ns": m, "p99_ns": p }),
    );
    Ok(())
}
