//! `lapse workloads quarantine|release|quarantined`: blocks on workloads that can
//! no longer be trusted. A quarantine ends the workload's grants and refuses its
//! new ones until an operator releases it.

use crate::client::{Server, answer, client, operator_token};
use crate::exit::Out;
use serde_json::{Value, json};

#[derive(clap::Subcommand)]
pub enum WorkloadsCmd {
    /// End the workload's grants and refuse new ones until released (sends a
    /// `workload-quarantined` signal: needs the `signal` role).
    Quarantine {
        workload: String,
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        reason: String,
    },
    /// Lift a quarantine (needs the `admin` role).
    Release {
        workload: String,
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        reason: String,
    },
    /// The quarantines standing.
    Quarantined {
        #[command(flatten)]
        server: Server,
    },
}

fn base(s: &Server) -> &str {
    s.url.trim_end_matches('/')
}

fn print_quarantine(q: &Value) {
    let audiences = q["audiences"]
        .as_array()
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| "every audience".into());
    println!(
        "{}  on {audiences}  by {}: {}",
        q["workload"].as_str().unwrap_or("?"),
        q["by"].as_str().unwrap_or("?"),
        q["reason"].as_str().unwrap_or("")
    );
}

pub async fn run(cmd: WorkloadsCmd, json_out: bool) -> Out {
    match cmd {
        WorkloadsCmd::Quarantine {
            workload,
            server,
            reason,
        } => {
            let v = answer(
                client()
                    .post(format!("{}/v1/signals", base(&server)))
                    .bearer_auth(operator_token(&server)?)
                    .json(&json!({
                        "type": "workload-quarantined",
                        "subject": { "workload": workload },
                        "reason": reason,
                    }))
                    .send()
                    .await,
            )
            .await?;
            if json_out {
                println!("{v}");
            } else {
                let ended = v["ended"].as_array().map_or(0, Vec::len);
                println!("{workload} is quarantined; {ended} grant(s) ended");
            }
        }
        WorkloadsCmd::Release {
            workload,
            server,
            reason,
        } => {
            let v = answer(
                client()
                    .post(format!("{}/v1/workloads/release", base(&server)))
                    .bearer_auth(operator_token(&server)?)
                    .json(&json!({ "workload": workload, "reason": reason }))
                    .send()
                    .await,
            )
            .await?;
            if json_out {
                println!("{v}");
            } else {
                println!("{workload} is released");
            }
        }
        WorkloadsCmd::Quarantined { server } => {
            let v = answer(
                client()
                    .get(format!("{}/v1/workloads/quarantined", base(&server)))
                    .bearer_auth(operator_token(&server)?)
                    .send()
                    .await,
            )
            .await?;
            if json_out {
                println!("{v}");
            } else {
                let list = v["quarantined"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("no workload is quarantined");
                }
                list.iter().for_each(print_quarantine);
            }
        }
    }
    Ok(())
}
