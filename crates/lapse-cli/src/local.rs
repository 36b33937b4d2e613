//! What the CLI finds on this machine without asking a broker: the dev folder,
//! and the store and key ring a config names.

use crate::exit::{Fail, fail};
use lapse_broker::config::Config;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The folder `lapse serve --dev` prepares, and where the CLI looks for the dev
/// issuer and the admin token.
pub(crate) const DEFAULT_DEV_DIR: &str = ".lapse-dev";

/// The store a config names, and its key ring. `private`: the ring must be able
/// to sign (rotation); otherwise public keys suffice, so an auditor can verify the
/// log without the key-encryption key.
pub(crate) async fn open_store(
    config: Option<PathBuf>,
    data: &Path,
    private: bool,
) -> Result<
    (
        Arc<dyn lapse_store::Store>,
        Arc<lapse_keyring::KeyRing>,
        Config,
    ),
    Fail,
> {
    use lapse_keyring::KeyRing;
    let path = config.unwrap_or_else(|| data.join("lapse.toml"));
    let cfg = Config::load(&path).map_err(|e| fail(1, e.to_string()))?;
    let ring = match (&cfg.key_encryption_key, private) {
        (None, _) => {
            let path = cfg
                .signing_key
                .as_deref()
                .ok_or_else(|| fail(1, lapse_keyring::KeyRingError::NoKeyFile.to_string()))?;
            KeyRing::single(
                lapse_token::SigningKey::load(path).map_err(|e| fail(1, e.to_string()))?,
            )
        }
        (Some(_), true) => KeyRing::new(cfg.key_sources()).map_err(|e| fail(1, e.to_string()))?,
        // The key-encryption key authenticates the keys when it is at hand.
        (Some(_), false) => {
            KeyRing::new(cfg.key_sources()).unwrap_or_else(|_| KeyRing::public_only())
        }
    };
    let ring = Arc::new(ring);
    let store = lapse_store::open(
        &cfg.store,
        ring.clone(),
        std::time::Duration::from_secs(cfg.store_timeout.secs().max(1)),
    )
    .await
    .map_err(|e| fail(7, e.to_string()))?;
    ring.reload(store.as_ref())
        .await
        .map_err(|e| fail(7, e.to_string()))?;
    Ok((store, ring, cfg))
}

pub(crate) fn note_unauthenticated(keys: &lapse_keyring::KeyRing) {
    if !keys.authenticated() {
        eprintln!(
            "note: the signing keys were read from the database without the key-encryption key; \
             someone with write access to the database could have replaced them. \
             Set the key-encryption key to verify against authenticated keys."
        );
    }
}
