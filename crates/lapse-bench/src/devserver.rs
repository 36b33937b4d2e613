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
    pub fn spawn() -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let data = tmp.path().join("data");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Child(
            std::process::Command::new(lapse_bin()?)
                .args(["serve", "--dev", "--listen", &addr.to_string(), "--data"])
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

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}
