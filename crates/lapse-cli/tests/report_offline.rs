#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! Issue 28 (24): `lapse report standing` needed a running broker. With
//! `--config` it reads the store itself: a grant issued by a real `lapse serve`
//! that has since stopped is in the report, and a target that cannot be reached
//! offline is a `target_unreachable` finding, not silence.

use lapse_testkit::process::{Running, show};
use serde_json::Value;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");
const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

fn lapse(args: &[&str]) -> Output {
    Command::new(LAPSE)
        .args(args)
        .env_remove("LAPSE_URL")
        .env_remove("LAPSE_TOKEN")
        // Nothing listens on port 1: the target is unreachable, as offline.
        .env(
            "LAPSE_TEST_ORDERS_ADMIN",
            "postgres://lapse@127.0.0.1:1/orders",
        )
        .output()
        .unwrap()
}

#[test]
fn standing_report_from_the_store_without_a_broker_names_unreachable_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let data_s = data.to_str().unwrap();
    let port = lapse_testkit::process::free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let served = Running(
        Command::new(LAPSE)
            .args(["serve", "--dev", "--data", data_s, "--listen", &listen])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(data.join("admin.token").exists() && std::net::TcpStream::connect(&listen).is_ok()) {
        assert!(Instant::now() < deadline, "lapse serve did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = lapse(&["dev", "token", "--workload", CI, "--data", data_s]);
    let identity = String::from_utf8(t.stdout).unwrap().trim().to_owned();
    let ok = lapse(&[
        "request",
        "--json",
        "--url",
        &url,
        "--identity-token",
        &identity,
        "--audience",
        "orders-db",
        "--scope",
        "read",
        "--task",
        "T-24",
        "--purpose",
        "offline report test",
    ]);
    assert!(ok.status.success(), "{}", show(&ok));
    drop(served);

    // The broker is gone; a PostgreSQL target is configured that nothing serves.
    let config = data.join("lapse.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[[postgres]]\naudience = \"orders-db\"\nadmin_url = \"env:LAPSE_TEST_ORDERS_ADMIN\"\n\n[[postgres.grant]]\naction = \"read\"\nschema = \"orders\"\nprivileges = [\"SELECT\"]\n",
    );
    std::fs::write(&config, text).unwrap();

    let o = lapse(&[
        "--json",
        "report",
        "standing",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(8), "findings: exit 8; {}", show(&o));
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    assert_eq!(v["offline"], true);
    assert_eq!(v["proof"]["issued_in_window"], 1, "{v}");
    assert_eq!(v["proof"]["audit_chain_verified"], true, "{v}");
    let unreachable: Vec<&Value> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "target_unreachable")
        .collect();
    assert!(!unreachable.is_empty(), "{v}");
    assert!(
        unreachable.iter().all(|f| f["target"] == "orders-db"),
        "{v}"
    );

    // Text output says it is offline and lists the unreachable target.
    let o = lapse(&["report", "standing", "--data", data_s]);
    assert_eq!(o.status.code(), Some(8), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("offline report"), "{out}");
    assert!(out.contains("target_unreachable"), "{out}");
    assert!(out.contains("1 issued"), "{out}");
}
