//! `lapse audit`: verify the chain (in the store, or an export offline) and
//! export it.

use crate::exit::{Fail, Out, fail};
use crate::local::{DEFAULT_DEV_DIR, note_unauthenticated, open_store};
use clap::Subcommand;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Verify the chain in the store named by the config (works with the server
    /// down), or an export (`--file`) offline.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_DEV_DIR)]
        data: PathBuf,
        /// An export (`lapse audit export`) to verify instead of the store.
        #[arg(long)]
        file: Option<PathBuf>,
        /// With `--file`: the signing keys as a JWKS document (saved from
        /// `/.well-known/jwks.json`), instead of the store's key ring.
        #[arg(long, requires = "file")]
        jwks: Option<PathBuf>,
    },
    /// Write the log as JSON Lines.
    Export {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = DEFAULT_DEV_DIR)]
        data: PathBuf,
        /// Output file; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The keys of a JWKS document, by key id.
fn jwks_keys(path: &Path) -> Result<HashMap<String, lapse_token::PublicKey>, Fail> {
    let text =
        std::fs::read_to_string(path).map_err(|e| fail(1, format!("{}: {e}", path.display())))?;
    let not_jwks = |e: String| fail(1, format!("{}: not a JWKS document: {e}", path.display()));
    let doc: Value = serde_json::from_str(&text).map_err(|e| not_jwks(e.to_string()))?;
    let jwks: Vec<lapse_token::Jwk> =
        serde_json::from_value(doc.get("keys").cloned().unwrap_or(Value::Null))
            .map_err(|e| not_jwks(format!("`keys`: {e}")))?;
    let mut keys = HashMap::new();
    for k in &jwks {
        let kid = k
            .kid
            .clone()
            .ok_or_else(|| fail(1, format!("{}: a key without `kid`", path.display())))?;
        let public = lapse_token::PublicKey::from_jwk(k)
            .map_err(|e| fail(1, format!("{}: key `{kid}`: {e}", path.display())))?;
        keys.insert(kid, public);
    }
    Ok(keys)
}

fn verify_export_file(
    file: &Path,
    key: impl Fn(&str) -> Option<lapse_token::PublicKey>,
) -> Result<lapse_store::VerifyReport, Fail> {
    let text =
        std::fs::read_to_string(file).map_err(|e| fail(1, format!("{}: {e}", file.display())))?;
    lapse_store::audit::verify_export(&text, |kid, m, s| {
        key(kid).is_some_and(|p| p.verify(m, s).is_ok())
    })
    .map_err(|e| fail(5, format!("{}: {e}", file.display())))
}

pub(crate) async fn run(cmd: AuditCmd, json_out: bool) -> Out {
    match cmd {
        AuditCmd::Verify {
            config,
            data,
            file,
            jwks,
        } => {
            let r = match (file, jwks) {
                (Some(file), Some(jwks)) => {
                    let keys = jwks_keys(&jwks)?;
                    verify_export_file(&file, |kid| keys.get(kid).cloned())?
                }
                (Some(file), None) => {
                    let (store, keys, _) = open_store(config, &data, false).await?;
                    note_unauthenticated(&keys);
                    keys.reload(store.as_ref())
                        .await
                        .map_err(|e| fail(7, e.to_string()))?;
                    verify_export_file(&file, |kid| keys.any(kid))?
                }
                (None, _) => {
                    let (store, keys, _) = open_store(config, &data, false).await?;
                    note_unauthenticated(&keys);
                    lapse_broker::audit::verify_audit(store.as_ref(), &keys)
                        .await
                        .map_err(|e| fail(7, e.to_string()))?
                }
            };
            if json_out {
                println!("{}", json!(r));
            } else if let Some((seq, why)) = &r.first_bad {
                println!("audit chain BROKEN at entry {seq}: {why}");
            } else {
                println!(
                    "audit chain verifies: {} entries, head {}",
                    r.entries,
                    r.head.as_deref().unwrap_or("(empty)")
                );
            }
            if r.ok() {
                Ok(())
            } else {
                Err(fail(5, "the audit chain does not verify"))
            }
        }
        AuditCmd::Export { config, data, out } => {
            use std::io::Write;
            let (store, _, _) = open_store(config, &data, false).await?;
            let mut w: Box<dyn Write> = match &out {
                Some(p) => Box::new(
                    std::fs::File::create(p)
                        .map_err(|e| fail(1, format!("{}: {e}", p.display())))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            // Entries, then the checkpoint read after them, as its last line: an
            // export verifies offline (`lapse audit verify --file`).
            let mut written: Result<(), Fail> = Ok(());
            let checkpoint = lapse_broker::audit::read_audit(store.as_ref(), |e| {
                if written.is_ok() {
                    written = serde_json::to_string(e)
                        .map_err(|e| fail(1, e.to_string()))
                        .and_then(|line| writeln!(w, "{line}").map_err(|e| fail(1, e.to_string())));
                }
            })
            .await
            .map_err(|e| fail(7, e.to_string()))?;
            written?;
            let trailer = lapse_store::audit::ExportTrailer {
                checkpoint: checkpoint.clone(),
            };
            let line = serde_json::to_string(&trailer).map_err(|e| fail(1, e.to_string()))?;
            writeln!(w, "{line}").map_err(|e| fail(1, e.to_string()))?;
            w.flush().map_err(|e| fail(1, e.to_string()))?;
            if let Some(cp) = checkpoint
                && !json_out
                && out.is_some()
            {
                eprintln!(
                    "exported through entry {} (signed checkpoint {})",
                    cp.seq, cp.hash
                );
            }
            Ok(())
        }
    }
}
