//! A private `redis-server` for one test: its own port on 127.0.0.1, no
//! persistence, `default` protected by a random password, killed on drop. Used
//! by lapse-providers' `tests/redis.rs` and lapse-server's conformance target.

use crate::process::{Running, free_port};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    // Dropped first: the server dies before its directory goes.
    _child: Running,
    pub port: u16,
    /// The `default` user's password (it holds `+@all`).
    pub root_password: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one and waits (bounded) until it answers.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lapse-redis-")
            .tempdir()
            .unwrap();
        let log = dir.path().join("redis.log");
        let root_password = format!("root-{:032x}", u128::from_le_bytes(random_bytes()));
        // A port taken between `free_port` and the server's bind: try another.
        for _ in 0..5 {
            let port = free_port();
            let spawned = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--requirepass", &root_password])
                .arg("--dir")
                .arg(dir.path())
                .arg("--logfile")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let mut child = match spawned {
                Ok(c) => Running(c),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "these tests start their own redis-server (Redis 7), and it is not installed: `apt-get install redis-server` (.ci/run installs it)"
                ),
                Err(e) => panic!("cannot start redis-server: {e}"),
            };
            if wait_ready(&mut child.0, port) {
                return Self {
                    _child: child,
                    port,
                    root_password,
                    _dir: dir,
                };
            }
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("redis-server did not start in 5 tries; its log:\n{log}");
    }

    /// `redis://default:…@127.0.0.1:port`.
    pub fn root_url(&self) -> String {
        format!(
            "redis://default:{}@127.0.0.1:{}",
            self.root_password, self.port
        )
    }

    pub fn url_for(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}", self.port)
    }
}

/// Whether the server answers within 10 s (false when it exited).
fn wait_ready(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut answer = [0u8; 1];
            // Any answer (`-NOAUTH …`) means it is serving.
            if s.write_all(b"PING\r\n").is_ok() && s.read(&mut answer).is_ok_and(|n| n == 1) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// 16 bytes from the OS (the root password need not be strong, only not fixed).
fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .unwrap();
    b
}
