//! A real `lapse serve --dev` process (the release binary beside this one) on a
//! free loopback port, killed when dropped.

use anyhow::bail;
use lapse_bench::http::Conn;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct DevServer {
    pub child: Child,
    pub addr: SocketAddr,
    /// The dev data folder (keys, `admin.token`, the store).
    pub data: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The release `lapse` binary beside this one.
pub fn lapse_bin() -> anyhow::Result<PathBuf> {
    let lapse = std::env::current_exe()?.with_file_name("lapse");
    if !lapse.exists() {
        bail!(
            "`{}` not found: build it with `cargo build --release -p lapse-cli`",
            lapse.display()
        );
    }
    Ok(lapse)
}

impl DevServer {
    /// `LAPSE_BENCH_SERVER_WRAPPER` (e.g. `heaptrack -o /tmp/lapse`) runs the server
    /// under a profiler; it is then stopped with SIGINT, so the profiler can write.
    pub fn spawn() -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data = tmp.path().join("data");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let wrapper = std::env::var("LAPSE_BENCH_SERVER_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = std::process::Command::new(w);
                c.args(words).arg(lapse_bin()?);
                c
            }
            None => std::process::Command::new(lapse_bin()?),
        };
        let child = Child(
            cmd.args(["serve", "--dev", "--listen", &addr.to_string(), "--data"])
                .arg(&data)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
        Ok(Self {
            child,
            addr,
            data,
            _tmp: tmp,
        })
    }

    /// Waits until it accepts connections.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while Conn::connect(self.addr).await.is_err() {
            if std::time::Instant::now() > deadline {
                bail!("lapse serve --dev did not listen");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The server's own process: under a wrapper, the wrapper's `lapse` child.
    pub fn pid(&self) -> u32 {
        let own = self.child.0.id();
        // The one process whose command line starts with the binary itself (a
        // wrapper's own command line starts with the wrapper).
        std::process::Command::new("pgrep")
            .args([
                "-n",
                "-f",
                &format!("^[^ ]*lapse serve --dev --listen {}", self.addr),
            ])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
            .unwrap_or(own)
    }
}

impl Drop for DevServer {
    /// A wrapped server is interrupted first and given time to finish writing.
    fn drop(&mut self) {
        let own = self.child.0.id();
        let pid = self.pid();
        if pid == own {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
