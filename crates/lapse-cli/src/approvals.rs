//! `lapse approvals list|show|approve|deny`: people deciding pending requests.

use crate::client::{Server, answer, client, operator_token};
use crate::exit::{Out, fail};
use lapse_core::TtlDuration;
use serde_json::{Value, json};

#[derive(clap::Subcommand)]
pub enum ApprovalsCmd {
    /// Requests waiting for approval.
    List {
        #[command(flatten)]
        server: Server,
    },
    /// One request with everything needed to decide: context, policies, audit
    /// entries and the workload's recent grants.
    Show {
        id: String,
        #[command(flatten)]
        server: Server,
    },
    /// Approve; optionally narrow to fewer actions or a shorter lifetime.
    Approve {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        reason: Option<String>,
        /// Space-separated actions to keep (a subset of those asked for).
        #[arg(long)]
        actions: Option<String>,
        /// A shorter lifetime than asked for, e.g. `10m`.
        #[arg(long)]
        ttl: Option<TtlDuration>,
    },
    /// Deny, with a reason the workload will see.
    Deny {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        reason: String,
    },
}

fn line(r: &Value) -> String {
    let actions = r["actions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!(
        "{}  {}  {} [{}]  ttl {}s  task {} ({})  needs {} from {}  approved by {}",
        r["id"].as_str().unwrap_or(""),
        r["workload"].as_str().unwrap_or(""),
        r["audience"].as_str().unwrap_or(""),
        actions,
        r["ttl"],
        r["task"]["id"].as_str().unwrap_or(""),
        r["task"]["purpose"].as_str().unwrap_or(""),
        r["approvals_required"],
        r["approvers"].as_str().unwrap_or("any approver"),
        r["approvals"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(|x| x["by"].as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "nobody yet".into()),
    )
}

pub async fn run(cmd: ApprovalsCmd, json_out: bool) -> Out {
    let http = client();
    let base = |s: &Server| s.url.trim_end_matches('/').to_owned();
    let v = match &cmd {
        ApprovalsCmd::List { server } => {
            answer(
                http.get(format!("{}/v1/approvals", base(server)))
                    .bearer_auth(operator_token(server)?)
                    .send()
                    .await,
            )
            .await?
        }
        ApprovalsCmd::Show { id, server } => {
            answer(
                http.get(format!("{}/v1/approvals/{id}", base(server)))
                    .bearer_auth(operator_token(server)?)
                    .send()
                    .await,
            )
            .await?
        }
        ApprovalsCmd::Approve {
            id,
            server,
            reason,
            actions,
            ttl,
        } => {
            let mut body = json!({});
            if let Some(r) = reason {
                body["reason"] = json!(r);
            }
            if let Some(a) = actions {
                body["actions"] = json!(a.split_whitespace().collect::<Vec<_>>());
            }
            if let Some(t) = ttl {
                body["ttl"] = json!(t.to_string());
            }
            answer(
                http.post(format!("{}/v1/approvals/{id}/approve", base(server)))
                    .bearer_auth(operator_token(server)?)
                    .json(&body)
                    .send()
                    .await,
            )
            .await?
        }
        ApprovalsCmd::Deny { id, server, reason } => {
            if reason.trim().is_empty() {
                return Err(fail(2, "`--reason` must say why"));
            }
            answer(
                http.post(format!("{}/v1/approvals/{id}/deny", base(server)))
                    .bearer_auth(operator_token(server)?)
                    .json(&json!({ "reason": reason }))
                    .send()
                    .await,
            )
            .await?
        }
    };
    if json_out {
        println!("{v}");
        return Ok(());
    }
    match cmd {
        ApprovalsCmd::List { .. } => {
            let requests = v["requests"].as_array().cloned().unwrap_or_default();
            if requests.is_empty() {
                println!("no requests are waiting for approval");
            }
            for r in requests {
                println!("{}", line(&r));
            }
        }
        ApprovalsCmd::Show { .. } => {
            println!("{}", line(&v));
            println!("context  {}", v["context"]);
            println!(
                "policies {}",
                v["policies"]
                    .as_array()
                    .map(|p| p
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
            for e in v["audit"].as_array().into_iter().flatten() {
                println!(
                    "  #{} {} {} {}",
                    e["seq"],
                    e["kind"].as_str().unwrap_or(""),
                    e["actor"].as_str().unwrap_or(""),
                    e["data"].as_str().unwrap_or("")
                );
            }
            println!("recent grants of this workload:");
            for h in v["history"].as_array().into_iter().flatten() {
                println!(
                    "  {} {} {} task {}",
                    h["id"].as_str().unwrap_or(""),
                    h["state"].as_str().unwrap_or(""),
                    h["audience"].as_str().unwrap_or(""),
                    h["task"].as_str().unwrap_or("")
                );
            }
        }
        ApprovalsCmd::Approve { .. } | ApprovalsCmd::Deny { .. } => {
            println!(
                "{} is {}",
                v["id"].as_str().unwrap_or(""),
                v["state"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// `lapse reviews list|close`: the mandatory reviews of break-glass grants.
#[derive(clap::Subcommand)]
pub enum ReviewsCmd {
    /// Open reviews (or all with --all).
    List {
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        all: bool,
    },
    /// Close a review with a verdict: `justified` or `unjustified`.
    Close {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        verdict: String,
        #[arg(long, default_value = "")]
        note: String,
    },
}

pub async fn reviews(cmd: ReviewsCmd, json_out: bool) -> Out {
    let http = client();
    match cmd {
        ReviewsCmd::List { server, all } => {
            let v = answer(
                http.get(format!(
                    "{}/v1/reviews?state={}",
                    server.url.trim_end_matches('/'),
                    if all { "all" } else { "open" }
                ))
                .bearer_auth(operator_token(&server)?)
                .send()
                .await,
            )
            .await?;
            if json_out {
                println!("{v}");
                return Ok(());
            }
            let reviews = v["reviews"].as_array().cloned().unwrap_or_default();
            if reviews.is_empty() {
                println!("no break-glass reviews are open");
            }
            for r in reviews {
                println!(
                    "{}  {}  {} [{}]  {}  opened {}  {}  justification: {}",
                    r["id"].as_str().unwrap_or(""),
                    r["workload"].as_str().unwrap_or(""),
                    r["audience"].as_str().unwrap_or(""),
                    r["actions"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(" "))
                        .unwrap_or_default(),
                    r["state"].as_str().unwrap_or(""),
                    r["review"]["opened_at"]
                        .as_i64()
                        .map(|ms| lapse_core::Timestamp::from_millis(ms).rfc3339())
                        .unwrap_or_default(),
                    r["review"]["verdict"].as_str().unwrap_or("open"),
                    r["review"]["justification"].as_str().unwrap_or(""),
                );
            }
        }
        ReviewsCmd::Close {
            id,
            server,
            verdict,
            note,
        } => {
            let v = answer(
                http.post(format!(
                    "{}/v1/reviews/{id}/close",
                    server.url.trim_end_matches('/')
                ))
                .bearer_auth(operator_token(&server)?)
                .json(&json!({ "verdict": verdict, "note": note }))
                .send()
                .await,
            )
            .await?;
            if json_out {
                println!("{v}");
            } else {
                println!(
                    "review of {} closed: {}",
                    v["id"].as_str().unwrap_or(""),
                    v["review"]["verdict"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}
