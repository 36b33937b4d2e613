//! `lapse keys`: the signing key ring in the store (needs `key_encryption_key`).

use crate::exit::{Out, fail};
use crate::local::{DEFAULT_DEV_DIR, open_store};
use clap::Subcommand;
use lapse_core::{Clock, SystemClock};
use lapse_keyring::Kek;
use serde_json::json;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum KeysCmd {
    /// List the ring: which key signs, which are published, which retired.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_DEV_DIR)]
        data: PathBuf,
    },
    /// Add a new signing key. It is published at once and signs after
    /// `key_publish_delay`; the key it replaces stays published until the longest
    /// token it signed has expired. Every replica picks it up within `key_refresh`.
    Rotate {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_DEV_DIR)]
        data: PathBuf,
    },
    /// Print a new random key-encryption key (64 hex digits) for
    /// `key_encryption_key = "env:NAME"` or `"file:PATH"`.
    NewKek,
}

pub async fn run(cmd: KeysCmd, json_out: bool) -> Out {
    let now = SystemClock.now().millis();
    match cmd {
        KeysCmd::NewKek => {
            println!("{}", Kek::generate());
            Ok(())
        }
        KeysCmd::List { config, data } => {
            let (_, ring, _) = open_store(config, &data, false).await?;
            let current = ring.signing_at(now).map(|k| k.kid);
            let keys: Vec<_> = ring
                .all()
                .iter()
                .map(|k| {
                    let state = if k.retires_at.is_some_and(|r| r <= now) {
                        "retired"
                    } else if Some(&k.kid) == current.as_ref() {
                        "signing"
                    } else if k.activates_at > now {
                        "published, not yet signing"
                    } else {
                        "published, retiring"
                    };
                    json!({ "kid": k.kid, "state": state, "activates_at": k.activates_at, "retires_at": k.retires_at })
                })
                .collect();
            if json_out {
                println!("{}", json!({ "keys": keys }));
            } else {
                for k in &keys {
                    println!(
                        "{}  {}{}",
                        k["kid"].as_str().unwrap_or_default(),
                        k["state"].as_str().unwrap_or_default(),
                        k["retires_at"]
                            .as_i64()
                            .map(|r| format!(" (retires at {r} ms)"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        KeysCmd::Rotate { config, data } => {
            let (store, ring, cfg) = open_store(config, &data, true).await?;
            if !ring.shared() {
                return Err(fail(
                    1,
                    "rotation needs the key ring in the store: set `key_encryption_key` in the config (see `lapse keys new-kek`)",
                ));
            }
            let longest = cfg.max_ttl.secs().max(cfg.break_glass_max_ttl.secs());
            let r = ring
                .rotate(
                    store.as_ref(),
                    now,
                    ms(cfg.key_publish_delay.secs()),
                    // Verifiers' clocks may run behind ours.
                    ms(longest).saturating_add(60_000),
                    "lapse keys rotate",
                )
                .await
                .map_err(|e| fail(7, e.to_string()))?;
            if json_out {
                println!("{}", json!(r));
            } else {
                println!(
                    "added {} (published now, signs from {} ms); retiring {:?} at {} ms",
                    r.new_kid, r.activates_at, r.retired, r.retires_at
                );
            }
            Ok(())
        }
    }
}

fn ms(secs: u64) -> i64 {
    i64::try_from(secs)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000)
}
