//! `lapse request`: one token exchange, its answer printed.

use crate::client::{Server, client};
use crate::exchange::{AccessArgs, exchange};
use crate::exit::{Fail, Out, fail};
use crate::local::DEFAULT_DEV_DIR;
use lapse_core::{Clock, SystemClock, TtlDuration};
use lapse_server::dev;
use lapse_token::DpopKey;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub(crate) struct RequestArgs {
    #[command(flatten)]
    server: Server,
    /// The identity token; or --identity-token-file; in dev, --dev-workload mints one.
    #[arg(long, env = "LAPSE_IDENTITY_TOKEN", hide_env_values = true)]
    identity_token: Option<String>,
    #[arg(long)]
    identity_token_file: Option<PathBuf>,
    /// Mint the identity token from the dev issuer for this workload.
    #[arg(long)]
    dev_workload: Option<String>,
    #[command(flatten)]
    access: AccessArgs,
    /// When the request needs approval, wait up to this long for people to decide
    /// (polling with the same DPoP key), showing who must approve.
    #[arg(long)]
    wait: Option<TtlDuration>,
    /// PEM file of the DPoP key: used if it exists, created (0600) if not. Without it
    /// a fresh key lives only in memory.
    #[arg(long)]
    dpop_key: Option<PathBuf>,
}

fn load_or_create_dpop(path: Option<&Path>) -> Result<DpopKey, Fail> {
    match path {
        None => Ok(DpopKey::generate()),
        Some(p) => {
            let (k, _) =
                lapse_token::SigningKey::load_or_generate(p).map_err(|e| fail(1, e.to_string()))?;
            Ok(DpopKey::from_signing(k))
        }
    }
}

pub(crate) async fn run(a: RequestArgs, json_out: bool) -> Out {
    let now = SystemClock.now().unix_seconds();
    let identity = match (&a.identity_token, &a.identity_token_file, &a.dev_workload) {
        (Some(t), None, None) => t.clone(),
        (None, Some(f), None) => std::fs::read_to_string(f)
            .map_err(|e| fail(1, format!("{}: {e}", f.display())))?
            .trim()
            .to_owned(),
        (None, None, Some(w)) => {
            dev::dev_token(Path::new(DEFAULT_DEV_DIR), w, 600, &[], now).map_err(|e| fail(1, e))?
        }
        _ => {
            return Err(fail(
                2,
                "give exactly one of --identity-token, --identity-token-file, --dev-workload",
            ));
        }
    };
    let key = load_or_create_dpop(a.dpop_key.as_deref())?;
    let http = client();
    let v = exchange(
        &http,
        a.server.url.trim_end_matches('/'),
        &key,
        &a.access.exchange_form(identity),
        a.wait,
    )
    .await
    .map_err(|(f, _)| f)?;
    if json_out {
        println!("{v}");
    } else {
        println!("grant    {}", v["grant_id"].as_str().unwrap_or(""));
        println!("scope    {}", v["scope"].as_str().unwrap_or(""));
        println!("expires  in {}s", v["expires_in"]);
        println!("dpop jkt {}", key.jkt());
        println!("token    {}", v["access_token"].as_str().unwrap_or(""));
    }
    Ok(())
}
