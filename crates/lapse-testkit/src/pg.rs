//! A PostgreSQL cluster of a test's own (initdb, pg_ctl), for tests that stop and
//! start the database or change its settings. As root, it runs as `postgres`.

use std::path::PathBuf;
use std::process::Command;

/// A PostgreSQL cluster of the test's own, so it can be stopped and started.
pub struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// Server options added at every start.
    options: String,
}

/// Runs a server tool; its failure fails the test with what it printed.
fn succeed(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LAPSE_TEST_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .filter(|p| p.join("pg_ctl").exists())
        .unwrap_or_else(|| panic!("PostgreSQL server binaries are needed (/usr/lib/postgresql/*/bin, or LAPSE_TEST_PG_BIN)"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

impl PrivatePg {
    /// PostgreSQL refuses to run as root: as root, the cluster runs as `postgres`.
    pub fn cmd(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    pub fn init() -> Self {
        Self::init_with(None)
    }

    /// A cluster that also speaks TLS with `server` as its certificate (plain
    /// connections stay allowed, so a test can compare).
    pub fn init_with_tls(server: &crate::pki::Leaf) -> Self {
        Self::init_with(Some(server))
    }

    fn init_with(tls: Option<&crate::pki::Leaf>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = match tls {
            None => String::new(),
            Some(leaf) => {
                let (cert, key) = leaf.write(dir.path(), "server");
                // PostgreSQL wants its key readable by it alone.
                std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .unwrap();
                format!(
                    " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                    cert.display(),
                    key.display()
                )
            }
        };
        let pg = Self {
            bin: pg_bin(),
            port: crate::process::free_port(),
            dir,
            options,
        };
        if is_root() {
            assert!(
                Command::new("chown")
                    .args(["-R", "postgres"])
                    .arg(pg.dir.path())
                    .status()
                    .unwrap()
                    .success()
            );
        }
        succeed(
            pg.cmd("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(pg.data()),
            "initdb",
        );
        pg.start();
        pg
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn start(&self) {
        succeed(
            self.cmd("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.path().join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {} -k {} -c listen_addresses=127.0.0.1{}",
                    self.port,
                    self.dir.path().display(),
                    self.options
                ))
                .args(["-w", "start"]),
            "pg_ctl start",
        );
    }

    pub fn stop(&self) {
        succeed(
            self.cmd("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        );
    }

    pub fn admin_url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = self
            .cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}
