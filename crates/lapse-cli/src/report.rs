//! `lapse report`: the standing-privilege report, from a running broker or
//! offline from its store.

use crate::client::{Server, answer, client, operator_token};
use crate::exit::{Out, fail};
use crate::local::{DEFAULT_DEV_DIR, note_unauthenticated, open_store};
use clap::Subcommand;
use lapse_core::{Clock, SystemClock, TtlDuration};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Subcommand)]
pub(crate) enum ReportCmd {
    /// Everything that looks like standing privilege; exits 8 when it finds any.
    Standing {
        #[command(flatten)]
        server: Server,
        /// Window the proof covers, e.g. `24h`.
        #[arg(long, default_value = "24h")]
        window: TtlDuration,
        /// Offline: build the report from the store this config names (as `lapse
        /// audit verify --config`), without a running broker. The targets are
        /// still asked directly; those that cannot be reached are findings.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Offline, with the config in this folder (`lapse.toml`).
        #[arg(long, conflicts_with = "config")]
        data: Option<PathBuf>,
    },
}

pub(crate) async fn run(cmd: ReportCmd, json_out: bool) -> Out {
    let ReportCmd::Standing {
        server,
        window,
        config,
        data,
    } = cmd;
    match (config, data) {
        (None, None) => standing(server, window, json_out).await,
        (config, data) => {
            let data = data.unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_DIR));
            standing_offline(config, &data, window, json_out).await
        }
    }
}

async fn standing(server: Server, window: TtlDuration, json_out: bool) -> Out {
    let url = format!("{}/v1/reports/standing", server.url.trim_end_matches('/'));
    let v = answer(
        client()
            .get(&url)
            .bearer_auth(operator_token(&server)?)
            .query(&[("window", format!("{}s", window.secs()))])
            .send()
            .await,
    )
    .await?;
    show_standing(&v, json_out)
}

/// `lapse report standing --config`: the server's report code over the store the
/// config names, with no broker running. The targets are asked as the broker would
/// ask them; offline they are often out of reach, which the report then says
/// (`target_unreachable`) rather than reporting them clean.
async fn standing_offline(
    config: Option<PathBuf>,
    data: &Path,
    window: TtlDuration,
    json_out: bool,
) -> Out {
    let (store, keys, cfg) = open_store(config, data, false).await?;
    note_unauthenticated(&keys);
    let mut providers: HashMap<String, Arc<dyn lapse_providers::CredentialProvider>> =
        HashMap::new();
    let mut notes = Vec::new();
    for table in cfg.providers() {
        match table.build() {
            Ok(provider) => {
                providers.insert(table.audience().to_owned(), provider);
            }
            Err(e) => notes.push(format!("target `{}` not checked: {e}", table.audience())),
        }
    }
    let mut v = lapse_broker::report::standing_report(
        lapse_broker::report::Sources {
            store: store.as_ref(),
            keys: &keys,
            providers: &providers,
            cfg: &cfg,
            now: SystemClock.now(),
        },
        window.secs(),
    )
    .await
    .map_err(|e| fail(7, e.to_string()))?;
    lapse_broker::json::set_field(&mut v, "offline", json!(true));
    lapse_broker::json::set_field(&mut v, "notes", json!(notes));
    if !json_out {
        println!(
            "offline report from the store (no broker asked); {} target(s) asked directly",
            providers.len()
        );
        for n in &notes {
            println!("note: {n}");
        }
    }
    show_standing(&v, json_out)
}

fn show_standing(v: &Value, json_out: bool) -> Out {
    let findings = v["findings"].as_array().cloned().unwrap_or_default();
    if json_out {
        println!("{v}");
    } else {
        let p = &v["proof"];
        println!(
            "window {} .. {}: {} issued, {} ended, {} still within their lifetime, {} without an end; audit chain {}",
            v["window"]["from"],
            v["window"]["to"],
            p["issued_in_window"],
            p["ended"],
            p["still_active_within_lifetime"],
            p["unended"],
            if p["audit_chain_verified"] == true {
                "verified"
            } else {
                "BROKEN"
            }
        );
        if findings.is_empty() {
            println!("no standing privilege found");
        }
        for f in &findings {
            let what = ["grant_id", "credential", "workload", "target"]
                .iter()
                .filter_map(|k| f[*k].as_str().map(|v| format!("{k}={v}")))
                .collect::<Vec<_>>()
                .join(" ");
            println!(
                "{:28} {what}  {}",
                f["kind"].as_str().unwrap_or(""),
                f["detail"].as_str().unwrap_or("")
            );
        }
    }
    if findings.is_empty() {
        Ok(())
    } else {
        Err(fail(8, format!("{} finding(s)", findings.len())))
    }
}
