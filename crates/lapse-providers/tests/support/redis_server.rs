#![allow(
    dead_code,
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! A private `redis-server` for one test: its own port on 127.0.0.1, no
//! persistence, `default` protected by a random password, killed on drop. Used
//! by lapse-providers' `tests/redis.rs` and lapse-server's conformance target.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    pub port: u16,
    /// The `default` user's password (it holds `+@all`).
    pub root_password: String,
    dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts one and waits (bounded) until it answers.
    pub fn start() -> Self {
        let tag = format!("{:016x}", rand::random::<u64>());
        let dir = std::env::temp_dir().join(format!("lapse-redis-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let root_password = format!("root-{tag}");
        // A port taken between `free_port` and the server's bind: try another.
        for _ in 0..5 {
            let port = free_port();
            let spawned = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--requirepass", &root_password])
                .arg("--dir")
                .arg(&dir)
                .arg("--logfile")
                .arg(dir.join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "these tests start their own redis-server (Redis 7), and it is not installed: `apt-get install redis-server` (.ci/run installs it)"
                ),
                Err(e) => panic!("cannot start redis-server: {e}"),
            };
            let mut server = Self {
                child,
                port,
                root_password: root_password.clone(),
                dir: dir.clone(),
            };
            if server.wait_ready() {
                return server;
            }
            let _ = server.child.kill();
            let _ = server.child.wait();
        }
        let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
        panic!("redis-server did not start in 5 tries; its log:\n{log}");
    }

    /// Whether it answers within 10 s (false when it exited).
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
