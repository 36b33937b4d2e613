#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! TLS everywhere a user runs it, with a private CA made here (rcgen): `lapse serve`
//! on HTTPS, `lapse request` trusting the CA only through `--ca-file` or
//! `LAPSE_CA_FILE`, and `lapse gate` reaching that broker the same way while
//! serving its own listener on TLS that only a proxy with a client certificate
//! from the configured bundle may use.

use lapse_testkit::pki::{ca, client, server_leaf, svid_leaf};
use lapse_testkit::process::{Running, free_port, show};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LAPSE: &str = env!("CARGO_BIN_EXE_lapse");
const CI: &str = "spiffe://dev.lapse.local/ci/deploy";

fn lapse(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(LAPSE);
    c.args(args)
        .env_remove("LAPSE_URL")
        .env_remove("LAPSE_TOKEN")
        .env_remove("LAPSE_CA_FILE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Spawns `lapse ARGS` and waits until `port` accepts connections.
fn start(args: &[&str], port: u16, log: &Path) -> Running {
    let child = Command::new(LAPSE)
        .args(args)
        .env_remove("LAPSE_CA_FILE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut r = Running(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = r.0.try_wait() {
            panic!(
                "`lapse {}` exited ({status}): {}",
                args.join(" "),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "`lapse {}` did not listen",
            args.join(" ")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    r
}

#[test]
fn a_private_ca_is_trusted_only_where_configured_and_the_gate_serves_mtls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    let pki = ca("private ca");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &pki.pem).unwrap();
    let ca_s = ca_file.to_str().unwrap();
    server_leaf(&pki).write(dir, "broker");
    server_leaf(&pki).write(dir, "gate");
    let proxies = ca("proxies");
    std::fs::write(dir.join("proxies.pem"), &proxies.pem).unwrap();

    // `lapse serve --dev` writes a config; serve that again, on HTTPS.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    {
        let _dev = start(
            &[
                "serve",
                "--dev",
                "--data",
                data.to_str().unwrap(),
                "--listen",
                &listen,
            ],
            port,
            &dir.join("dev.log"),
        );
    }
    let config = data.join("lapse.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let port = free_port();
    let text = text.replace(&listen, &format!("127.0.0.1:{port}"))
        + &format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.join("broker.pem").display(),
            dir.join("broker.key").display()
        );
    std::fs::write(&config, text).unwrap();
    let _broker = start(
        &["serve", "--config", config.to_str().unwrap()],
        port,
        &dir.join("broker.log"),
    );
    let url = format!("https://127.0.0.1:{port}");

    let t = lapse(
        &[
            "dev",
            "token",
            "--workload",
            CI,
            "--data",
            data.to_str().unwrap(),
        ],
        &[],
    );
    assert!(t.status.success(), "{}", show(&t));
    let identity = String::from_utf8(t.stdout).unwrap().trim().to_owned();
    let request = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
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
            "T-tls",
            "--purpose",
            "private ca",
        ];
        args.extend_from_slice(extra);
        lapse(&args, env)
    };

    // The system roots do not know the private CA: the handshake fails, exit 7.
    let o = request(&[], &[]);
    assert_eq!(o.status.code(), Some(7), "{}", show(&o));
    assert!(show(&o).contains("cannot reach Lapse"), "{}", show(&o));
    // Trusted through the option, and through the environment.
    let o = request(&["--ca-file", ca_s], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["token_type"], "DPoP", "{v}");
    let o = request(&[], &[("LAPSE_CA_FILE", ca_s)]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    // A CA file that is not one is a usage error, not a silent fallback.
    let o = request(&["--ca-file", config.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(show(&o).contains("--ca-file"), "{}", show(&o));

    // The gate: reaches the HTTPS broker through --ca-file, serves mTLS itself.
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let token_file = dir.join("gate.token");
    std::fs::write(&token_file, admin.trim()).unwrap();
    let gport = free_port();
    let gate_cfg = include_str!("../../../examples/gate/gate.toml")
        .replace("127.0.0.1:7900", &format!("127.0.0.1:{gport}"))
        .replace("http://127.0.0.1:7800", &url)
        .replace(
            "file:/etc/lapse/gate.token",
            &format!("file:{}", token_file.display()),
        )
        + &format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nrequire_client_cert = true\n",
            dir.join("gate.pem").display(),
            dir.join("gate.key").display(),
            dir.join("proxies.pem").display()
        );
    let gate_toml = dir.join("gate.toml");
    std::fs::write(&gate_toml, &gate_cfg).unwrap();
    // Without the CA the gate cannot fetch the broker's keys: it starts closed.
    let closed_port = free_port();
    let closed_toml = dir.join("closed-gate.toml");
    std::fs::write(
        &closed_toml,
        gate_cfg.replace(
            &format!("127.0.0.1:{gport}"),
            &format!("127.0.0.1:{closed_port}"),
        ),
    )
    .unwrap();
    let _closed = start(
        &["gate", "--config", closed_toml.to_str().unwrap()],
        closed_port,
        &dir.join("closed-gate.log"),
    );
    let _gate = start(
        &[
            "--ca-file",
            ca_s,
            "gate",
            "--config",
            gate_toml.to_str().unwrap(),
        ],
        gport,
        &dir.join("gate.log"),
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let gate = format!("https://127.0.0.1:{gport}");
        // No client certificate, or one from another CA: no handshake.
        assert!(
            client(&pki, None)
                .get(format!("{gate}/healthz"))
                .send()
                .await
                .is_err()
        );
        let stranger = svid_leaf(&ca("elsewhere"), "spiffe://other/proxy");
        assert!(
            client(&pki, Some(&stranger))
                .get(format!("{gate}/healthz"))
                .send()
                .await
                .is_err()
        );
        // The proxy's certificate: the gate answers, and refuses a tokenless request.
        let proxy = client(
            &pki,
            Some(&svid_leaf(&proxies, "spiffe://dev.lapse.local/nginx")),
        );
        let r = proxy.get(format!("{gate}/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let r = proxy
            .get(format!("{gate}/check"))
            .header("X-Original-Method", "GET")
            .header("X-Original-URI", "/orders/1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(
            challenge == "DPoP algs=\"EdDSA ES256 RS256\"",
            "{challenge}"
        );
        // The gate that does not trust the broker's CA is up but closed.
        let closed = format!("https://127.0.0.1:{closed_port}");
        let r = proxy.get(format!("{closed}/readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        let r = proxy
            .get(format!("{closed}/check"))
            .header("X-Original-Method", "GET")
            .header("X-Original-URI", "/orders/1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "2");
    });
}
