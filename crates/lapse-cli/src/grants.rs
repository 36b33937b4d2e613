//! `lapse grants`: inspect and end grants, as an operator or as the workload that
//! holds one.

use crate::client::{Server, answer, client, operator_token};
use crate::exit::{Fail, Out, fail};
use clap::Subcommand;
use lapse_core::{Clock, SystemClock, TtlDuration};
use lapse_token::DpopKey;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(crate) enum GrantsCmd {
    /// Newest first, one page at a time (`--before` the last page's cursor), or
    /// every page with `--all`.
    List {
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        workload: Option<String>,
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        audience: Option<String>,
        /// Grants per page (the server caps it at 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this cursor (a page's `next`).
        #[arg(long)]
        before: Option<String>,
        /// Follow the cursors to the last page.
        #[arg(long)]
        all: bool,
    },
    Show {
        id: String,
        #[command(flatten)]
        server: Server,
    },
    /// End your own grant (workload): needs its access token and DPoP key.
    Complete {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long, env = "LAPSE_ACCESS_TOKEN", hide_env_values = true)]
        access_token: String,
        #[arg(long)]
        dpop_key: PathBuf,
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a grant as an operator.
    Revoke {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long)]
        reason: Option<String>,
        /// A gate (its base URL, e.g. http://gate:7900) that must have applied the
        /// ending before this answers: its `/readyz` `feed_position` reaches the
        /// revoke's. Repeatable. Without it the answer may come before gates hear.
        #[arg(long = "wait-gate")]
        wait_gates: Vec<String>,
        /// How long to wait for the gates (`--wait-gate`); then exit 7 naming
        /// those that did not confirm.
        #[arg(long, default_value = "5s")]
        wait_timeout: TtlDuration,
    },
    /// Renew your own grant (workload): policy decides again.
    Renew {
        id: String,
        #[command(flatten)]
        server: Server,
        #[arg(long, env = "LAPSE_ACCESS_TOKEN", hide_env_values = true)]
        access_token: String,
        #[arg(long)]
        dpop_key: PathBuf,
        #[arg(long)]
        ttl: Option<TtlDuration>,
    },
}

pub(crate) async fn run(cmd: GrantsCmd, json_out: bool) -> Out {
    match cmd {
        GrantsCmd::List {
            server,
            state,
            workload,
            task,
            audience,
            limit,
            before,
            all,
        } => {
            let filters = [
                ("state", state),
                ("workload", workload),
                ("task", task),
                ("audience", audience),
            ];
            list(&server, filters, limit, before, all, json_out).await
        }
        GrantsCmd::Show { id, server } => show(&id, &server, json_out).await,
        GrantsCmd::Revoke {
            id,
            server,
            reason,
            wait_gates,
            wait_timeout,
        } => revoke(&id, &server, reason, &wait_gates, wait_timeout, json_out).await,
        GrantsCmd::Complete {
            id,
            server,
            access_token,
            dpop_key,
            reason,
        } => complete(&id, &server, &access_token, &dpop_key, reason, json_out).await,
        GrantsCmd::Renew {
            id,
            server,
            access_token,
            dpop_key,
            ttl,
        } => renew(&id, &server, &access_token, &dpop_key, ttl, json_out).await,
    }
}

/// `filters`: query parameters, each sent only when given.
async fn list(
    server: &Server,
    filters: [(&'static str, Option<String>); 4],
    limit: usize,
    mut before: Option<String>,
    all: bool,
    json_out: bool,
) -> Out {
    let mut q = vec![("limit", limit.to_string())];
    for (k, v) in filters {
        if let Some(v) = v {
            q.push((k, v));
        }
    }
    let url = format!("{}/v1/grants", server.url.trim_end_matches('/'));
    let token = operator_token(server)?;
    let mut listed = Vec::new();
    let next = loop {
        let mut page = q.clone();
        if let Some(b) = &before {
            page.push(("before", b.clone()));
        }
        let v = answer(
            client()
                .get(&url)
                .bearer_auth(&token)
                .query(&page)
                .send()
                .await,
        )
        .await?;
        listed.extend(v["grants"].as_array().into_iter().flatten().cloned());
        let next = v["next"].as_str().map(str::to_owned);
        match next {
            Some(n) if all => before = Some(n),
            other => break other,
        }
    };
    if json_out {
        println!("{}", json!({ "grants": listed, "next": next }));
    } else {
        for g in &listed {
            print_grant(g);
        }
        if let Some(n) = next {
            eprintln!("more grants: --before {n} (or --all)");
        }
    }
    Ok(())
}

async fn show(id: &str, server: &Server, json_out: bool) -> Out {
    let url = format!("{}/v1/grants/{id}", server.url.trim_end_matches('/'));
    let v = answer(
        client()
            .get(&url)
            .bearer_auth(operator_token(server)?)
            .send()
            .await,
    )
    .await?;
    if json_out {
        println!("{v}");
    } else {
        print_grant(&v);
        for e in v["audit"].as_array().into_iter().flatten() {
            println!(
                "  #{:<6} {}  {:<18} {}",
                e["seq"],
                lapse_core::Timestamp::from_millis(e["at"].as_i64().unwrap_or(0)).rfc3339(),
                e["kind"].as_str().unwrap_or(""),
                e["actor"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

/// Revokes as an operator; with `wait_gates`, answers only once those gates have
/// applied the ending (exit 7 naming the late ones after `wait_timeout`).
async fn revoke(
    id: &str,
    server: &Server,
    reason: Option<String>,
    wait_gates: &[String],
    wait_timeout: TtlDuration,
    json_out: bool,
) -> Out {
    let url = format!("{}/v1/grants/{id}/revoke", server.url.trim_end_matches('/'));
    let v = answer(
        client()
            .post(&url)
            .bearer_auth(operator_token(server)?)
            .json(&json!({ "reason": reason }))
            .send()
            .await,
    )
    .await?;
    if !wait_gates.is_empty() {
        let at = v["feed_position"].as_u64().unwrap_or(0);
        let within = std::time::Duration::from_secs(wait_timeout.secs().max(1));
        let late = gates_behind(wait_gates, at, within).await;
        if !late.is_empty() {
            return Err(fail(
                7,
                format!(
                    "revoked, but these gates had not applied it (feed position {at}) within {}s: {}",
                    within.as_secs(),
                    late.join("; ")
                ),
            ));
        }
    }
    if json_out {
        println!("{v}")
    } else {
        print_grant(&v)
    }
    Ok(())
}

async fn complete(
    id: &str,
    server: &Server,
    access_token: &str,
    dpop_key: &Path,
    reason: Option<String>,
    json_out: bool,
) -> Out {
    let v = workload_call(
        server,
        id,
        "complete",
        access_token,
        dpop_key,
        json!({ "reason": reason }),
    )
    .await?;
    if json_out {
        println!("{v}")
    } else {
        print_grant(&v)
    }
    Ok(())
}

async fn renew(
    id: &str,
    server: &Server,
    access_token: &str,
    dpop_key: &Path,
    ttl: Option<TtlDuration>,
    json_out: bool,
) -> Out {
    let body = match ttl {
        Some(t) => json!({ "ttl": t.to_string() }),
        None => json!({}),
    };
    let v = workload_call(server, id, "renew", access_token, dpop_key, body).await?;
    if json_out {
        println!("{v}");
    } else {
        println!("expires  in {}s", v["expires_in"]);
        println!("token    {}", v["access_token"].as_str().unwrap_or(""));
    }
    Ok(())
}

fn print_grant(g: &Value) {
    println!(
        "{}  {:<9}  {}  {} [{}]  task {}  expires {}",
        g["id"].as_str().unwrap_or(""),
        g["state"].as_str().unwrap_or(""),
        g["workload"].as_str().unwrap_or(""),
        g["audience"].as_str().unwrap_or(""),
        g["actions"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
        g["task"]["id"].as_str().unwrap_or(""),
        g["expires_at"]
            .as_i64()
            .map(|ms| lapse_core::Timestamp::from_millis(ms).rfc3339())
            .unwrap_or_default(),
    );
}

async fn workload_call(
    server: &Server,
    id: &str,
    action: &str,
    token: &str,
    key_path: &Path,
    body: Value,
) -> Result<Value, Fail> {
    let key = lapse_token::SigningKey::load(key_path).map_err(|e| fail(1, e.to_string()))?;
    let key = DpopKey::from_signing(key);
    let url = format!(
        "{}/v1/grants/{id}/{action}",
        server.url.trim_end_matches('/')
    );
    let proof = key.proof("POST", &url, Some(token), SystemClock.now().unix_seconds());
    answer(
        client()
            .post(&url)
            .header("Authorization", format!("DPoP {token}"))
            .header("DPoP", proof)
            .json(&body)
            .send()
            .await,
    )
    .await
}

/// The gates (of `gates`) whose `/readyz` `feed_position` did not reach `at`
/// within `within`, each with what it last said.
async fn gates_behind(gates: &[String], at: u64, within: std::time::Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    let http = client();
    let mut waiting: Vec<(String, String)> = gates
        .iter()
        .map(|g| {
            (
                g.trim_end_matches('/').to_owned(),
                "not asked yet".to_owned(),
            )
        })
        .collect();
    loop {
        let mut still = Vec::new();
        for (gate, _) in waiting {
            let asked = http
                .get(format!("{gate}/readyz"))
                .timeout(std::time::Duration::from_secs(1))
                .send()
                .await;
            let said = match asked {
                Ok(r) => match r.json::<Value>().await {
                    Ok(v) if v["feed_position"].as_u64().is_some_and(|p| p >= at) => continue,
                    Ok(v) => format!("at feed position {}", v["feed_position"]),
                    Err(e) => format!("no readiness answer: {e}"),
                },
                Err(e) => format!("unreachable: {e}"),
            };
            still.push((gate, said));
        }
        waiting = still;
        if waiting.is_empty() || std::time::Instant::now() >= deadline {
            return waiting
                .into_iter()
                .map(|(g, why)| format!("{g} ({why})"))
                .collect();
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
