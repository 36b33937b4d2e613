#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Issue 28 (6b): what `lapse serve` writes to its log, as an operator sees it:
//! `RUST_LOG` is honoured, no colour codes when stderr is not a terminal, a
//! "listening on ADDR" line, and a refused operator token is logged without the
//! token.

use lapse_testkit::process::Running;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serve_logs_per_rust_log_without_colours_and_says_where_it_listens() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let log_path = tmp.path().join("stderr.log");
    let port = lapse_testkit::process::free_port();
    let listen = format!("127.0.0.1:{port}");
    let child = Command::new(LAPSE)
        .args(["serve", "--dev", "--data"])
        .arg(&data)
        .args(["--listen", &listen])
        .env_remove("LAPSE_LOG")
        // Everything but the store's lines: without RUST_LOG its "store migration
        // applied" lines would be there.
        .env("RUST_LOG", "info,lapse_store=off")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let _served = Running(child);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for("the listener", || {
        std::net::TcpStream::connect(&listen).is_ok() && log().contains("listening on")
    });

    let guess = "lapse_op_guessed-token-that-is-not-configured";
    let head = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&listen).unwrap();
        write!(
            s,
            "GET /v1/grants HTTP/1.1\r\nHost: {listen}\r\nAuthorization: Bearer {guess}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    wait_for("the refusal in the log", || {
        log().contains("authentication failed")
    });

    let text = log();
    assert!(
        text.contains(&format!("listening on {listen}")),
        "no listening line: {text}"
    );
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");
    assert!(
        !text.contains("store migration applied"),
        "RUST_LOG not honoured (the store's lines are there): {text}"
    );
    let refusal = text
        .lines()
        .find(|l| l.contains("authentication failed"))
        .unwrap();
    assert!(refusal.contains("WARN"), "{refusal}");
    assert!(refusal.contains("operator_token"), "{refusal}");
    assert!(refusal.contains("127.0.0.1"), "{refusal}");
    assert!(!text.contains(guess), "the token is never logged: {text}");
}
