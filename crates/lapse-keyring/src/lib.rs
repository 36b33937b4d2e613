//! The signing key ring: which key signs now, which keys verify, and rotation.
//!
//! Two modes. Without a key-encryption key (`key_encryption_key` unset) the ring is
//! the one key in `signing_key` — enough for one process. With one, the ring lives
//! in the store, shared by every replica: public keys in the clear, private keys
//! sealed with AES-256-GCM under the key-encryption key (the key id is the
//! associated data, so a sealed key moved to another row does not open). The
//! key-encryption key comes from the environment or a file, never the database.
//!
//! Rotation adds a key that is published at once and signs only from
//! `activates_at` (after `key_publish_delay`, so every verifier's cached JWKS has it
//! before it meets a token signed with it); the key it replaces stays published
//! until the longest token it signed has expired. Records are never deleted, so
//! an audit checkpoint signed by any past key still verifies.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use arc_swap::ArcSwap;
use lapse_store::{AuditEvent, AuditSigner, KeyRecord, Store, StoreError, WriteBatch};
use lapse_token::{Jwk, PublicKey, SigningKey};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

const ALG: &str = "EdDSA";

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("key-encryption key: {0}")]
    Kek(String),
    #[error(
        "signing key `{kid}` does not open with this key-encryption key (a different key, or the record was altered)"
    )]
    Unseal { kid: String },
    #[error("signing key record `{kid}`: {why}")]
    Record { kid: String, why: String },
    #[error("the key ring is empty")]
    Empty,
    #[error("no `signing_key` file and no `key_encryption_key`: nothing can sign")]
    NoKeyFile,
    #[error("rotation needs a key ring in the store: set `key_encryption_key` in the config")]
    NotShared,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    KeyFile(#[from] lapse_token::signing::KeyFileError),
}

/// Where the ring's keys come from: the `signing_key` file and the
/// `key_encryption_key` source of `lapse.toml`.
#[derive(Clone, Copy, Debug, Default)]
pub struct KeySources<'a> {
    pub signing_key: Option<&'a Path>,
    pub key_encryption_key: Option<&'a str>,
}

/// The 256-bit key that seals private keys at rest.
pub struct Kek(Aes256Gcm);

impl Kek {
    /// Reads it from `env:NAME` or `file:PATH`: 32 bytes as 64 hex digits or
    /// base64url (surrounding whitespace ignored).
    pub fn load(source: &str) -> Result<Self, KeyRingError> {
        let text = if let Some(name) = source.strip_prefix("env:") {
            std::env::var(name).map_err(|_| {
                KeyRingError::Kek(format!("environment variable `{name}` is not set"))
            })?
        } else if let Some(path) = source.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .map_err(|e| KeyRingError::Kek(format!("cannot read `{path}`: {e}")))?
        } else {
            return Err(KeyRingError::Kek(
                "expected `env:NAME` or `file:PATH` (the key itself never goes in the config)"
                    .into(),
            ));
        };
        Self::parse(text.trim())
    }

    pub fn parse(text: &str) -> Result<Self, KeyRingError> {
        let bytes = hex::decode(text)
            .ok()
            .or_else(|| lapse_token::b64::decode(text.trim_end_matches('=')))
            .ok_or_else(|| KeyRingError::Kek("not hex or base64url".into()))?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyRingError::Kek("must be exactly 32 bytes".into()))?;
        Ok(Self(Aes256Gcm::new(&key.into())))
    }

    /// A new random key-encryption key, as 64 hex digits.
    pub fn generate() -> String {
        hex::encode(rand::random::<[u8; 32]>())
    }

    fn seal(&self, binding: &[u8], secret: &[u8; 32]) -> Result<Vec<u8>, KeyRingError> {
        let nonce: [u8; 12] = rand::random();
        let ct = self
            .0
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: secret,
                    aad: binding,
                },
            )
            .map_err(|_| KeyRingError::Kek("sealing failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend(ct);
        Ok(out)
    }

    fn open(&self, kid: &str, binding: &[u8], sealed: &[u8]) -> Result<[u8; 32], KeyRingError> {
        let fail = || KeyRingError::Unseal {
            kid: kid.to_owned(),
        };
        let nonce: [u8; 12] = sealed
            .get(..12)
            .and_then(|n| n.try_into().ok())
            .ok_or_else(fail)?;
        let ct = sealed.get(12..).ok_or_else(fail)?;
        let plain = self
            .0
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ct,
                    aad: binding,
                },
            )
            .map_err(|_| fail())?;
        plain.try_into().map_err(|_| fail())
    }
}

/// A key of the ring, ready to use.
#[derive(Clone)]
pub struct RingKey {
    pub kid: String,
    pub jwk: Jwk,
    pub public: PublicKey,
    /// `None` where only the public part is loaded (verification without the
    /// key-encryption key).
    pub signing: Option<SigningKey>,
    pub activates_at: i64,
    pub retires_at: Option<i64>,
}

impl RingKey {
    /// Whether it is in the JWKS (and verifies tokens) at `now` (ms).
    pub fn published(&self, now: i64) -> bool {
        self.retires_at.is_none_or(|r| now < r)
    }
}

pub struct KeyRing {
    keys: ArcSwap<Vec<RingKey>>,
    kek: Option<Kek>,
    /// Whether the keys come from the store (and are re-read from it).
    stored: bool,
}

impl KeyRing {
    /// A ring of one key that never rotates (the `signing_key` file).
    pub fn single(key: SigningKey) -> Self {
        let k = RingKey {
            kid: key.kid().to_owned(),
            jwk: key.jwk().clone(),
            public: key.public().clone(),
            signing: Some(key),
            activates_at: 0,
            retires_at: None,
        };
        Self {
            keys: ArcSwap::from_pointee(vec![k]),
            kek: None,
            stored: false,
        }
    }

    /// The ring for `src`: the `signing_key` file's key, or — with a key-encryption
    /// key — an empty shared ring that [`KeyRing::init`] fills from the store.
    pub fn new(src: KeySources<'_>) -> Result<Self, KeyRingError> {
        match src.key_encryption_key {
            None => {
                let path = src.signing_key.ok_or(KeyRingError::NoKeyFile)?;
                let (key, created) = SigningKey::load_or_generate(path)?;
                if created {
                    tracing::info!(kid = key.kid(), path = %path.display(), "generated a new signing key");
                }
                Ok(Self::single(key))
            }
            Some(source) => Ok(Self {
                keys: ArcSwap::from_pointee(vec![]),
                kek: Some(Kek::load(source)?),
                stored: true,
            }),
        }
    }

    /// Loads a shared ring from the store. The first replica on an empty store seeds
    /// it — with the `signing_key` file's key when one exists, so tokens already
    /// issued keep verifying — in an audited commit.
    pub async fn init(
        &self,
        src: KeySources<'_>,
        store: &dyn Store,
        now: i64,
    ) -> Result<(), KeyRingError> {
        let Some(kek) = &self.kek else {
            return Ok(());
        };
        if store.keys().await?.is_empty() {
            let file = src.signing_key.map(SigningKey::load);
            let key = match file {
                None => SigningKey::generate(),
                Some(Ok(k)) => k,
                Some(Err(lapse_token::signing::KeyFileError::Read { source, .. }))
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    SigningKey::generate()
                }
                Some(Err(e)) => return Err(e.into()),
            };
            let record = seal_record(kek, &key, now, now, None)?;
            // The seeding commit's checkpoint is signed by the key it adds.
            self.install(std::slice::from_ref(&record))?;
            let seeded = store
                .commit(WriteBatch {
                    keys_expected: Some(vec![]),
                    keys: vec![record],
                    events: vec![ring_event(
                        now,
                        "key.added",
                        "lapse",
                        json!({ "kid": key.kid(), "alg": ALG, "reason": "first key of the ring" }),
                    )],
                    ..Default::default()
                })
                .await;
            match seeded {
                // Another replica seeded it first: use that ring.
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                // Its seeding commit may also have landed just before ours, signed
                // by the key it added, which this ring does not know yet: the
                // writer then refuses to append after it. Use that ring too.
                Err(_) if !store.keys().await?.is_empty() => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.reload(store).await
    }

    /// A ring of the store's public keys only (fill it with [`KeyRing::reload`]):
    /// enough to verify tokens and the audit log without the key-encryption key.
    pub fn public_only() -> Self {
        Self {
            keys: ArcSwap::from_pointee(vec![]),
            kek: None,
            stored: true,
        }
    }

    /// Whether the keys are authenticated: the file key, or store records opened
    /// with the key-encryption key (not the public parts alone, which anyone with
    /// write access to the database could have put there).
    pub fn authenticated(&self) -> bool {
        !self.stored || self.kek.is_some()
    }

    /// Whether the ring is the store's (shared and rotatable).
    pub fn shared(&self) -> bool {
        self.stored
    }

    /// Reads the ring from the store again (another replica may have rotated).
    pub async fn reload(&self, store: &dyn Store) -> Result<(), KeyRingError> {
        if !self.stored {
            return Ok(());
        }
        let records = store.keys().await?;
        if records.is_empty() {
            return Err(KeyRingError::Empty);
        }
        self.install(&records)
    }

    fn install(&self, records: &[KeyRecord]) -> Result<(), KeyRingError> {
        let mut keys = Vec::with_capacity(records.len());
        for r in records {
            let bad = |why: String| KeyRingError::Record {
                kid: r.kid.clone(),
                why,
            };
            let stored: Jwk = serde_json::from_slice(&r.public).map_err(|e| bad(e.to_string()))?;
            let (jwk, signing) = match &self.kek {
                // The sealed key is the authority: the public key is derived from it,
                // and a stored public key that differs is tampering.
                Some(kek) => {
                    let secret = kek.open(
                        &r.kid,
                        &binding(&r.kid, r.activates_at, r.retires_at),
                        &r.sealed,
                    )?;
                    let key = SigningKey::from_secret_bytes(&secret);
                    if key.kid() != r.kid || key.jwk() != &stored {
                        return Err(bad(
                            "the stored public key or id does not match the sealed key".into(),
                        ));
                    }
                    (key.jwk().clone(), Some(key))
                }
                // Without the key-encryption key nothing authenticates a record; at
                // least its id must be its key's thumbprint.
                None => {
                    let mut bare = stored.clone();
                    bare.kid = None;
                    bare.alg = None;
                    bare.use_ = None;
                    if lapse_token::jwk::thumbprint(&bare).ok().as_deref() != Some(r.kid.as_str()) {
                        return Err(bad("the key id is not the key's thumbprint".into()));
                    }
                    (stored, None)
                }
            };
            let public = PublicKey::from_jwk(&jwk).map_err(|e| bad(e.to_string()))?;
            keys.push(RingKey {
                kid: r.kid.clone(),
                jwk,
                public,
                signing,
                activates_at: r.activates_at,
                retires_at: r.retires_at,
            });
        }
        self.keys.store(Arc::new(keys));
        Ok(())
    }

    /// The key that signs at `now` (ms): the most recently activated one that is
    /// active and not retired.
    pub fn current_at(&self, now: i64) -> Option<SigningKey> {
        self.signing_at(now).and_then(|k| k.signing)
    }

    /// The ring key that signs at `now` (its private part only when loaded).
    pub fn signing_at(&self, now: i64) -> Option<RingKey> {
        self.keys
            .load()
            .iter()
            .filter(|k| k.activates_at <= now && k.published(now))
            .max_by(|a, b| {
                a.activates_at
                    .cmp(&b.activates_at)
                    .then_with(|| b.kid.cmp(&a.kid))
            })
            .cloned()
    }

    /// The signing key now.
    pub fn current(&self) -> Option<SigningKey> {
        self.current_at(now_ms())
    }

    /// A key that verifies tokens now: published (not retired).
    pub fn verifying(&self, kid: &str) -> Option<PublicKey> {
        let now = now_ms();
        self.keys
            .load()
            .iter()
            .find(|k| k.kid == kid && k.published(now))
            .map(|k| k.public.clone())
    }

    /// Any key the ring ever had, retired or not (audit checkpoints).
    pub fn any(&self, kid: &str) -> Option<PublicKey> {
        self.keys
            .load()
            .iter()
            .find(|k| k.kid == kid)
            .map(|k| k.public.clone())
    }

    /// The JWKS `keys`: every published key.
    pub fn jwks(&self) -> Vec<Jwk> {
        let now = now_ms();
        self.keys
            .load()
            .iter()
            .filter(|k| k.published(now))
            .map(|k| k.jwk.clone())
            .collect()
    }

    pub fn all(&self) -> Arc<Vec<RingKey>> {
        self.keys.load_full()
    }

    /// Adds a key that signs from `now + publish_delay`; the key signing now retires
    /// once every token it could still sign has expired. Both in one audited commit.
    pub async fn rotate(
        &self,
        store: &dyn Store,
        now: i64,
        publish_delay_ms: i64,
        longest_token_ms: i64,
        actor: &str,
    ) -> Result<Rotation, KeyRingError> {
        let Some(kek) = &self.kek else {
            return Err(KeyRingError::NotShared);
        };
        // One read: the ring installed and the records rotated are the same.
        let records = store.keys().await?;
        self.install(&records)?;
        let old = self.current_at(now);
        let new = SigningKey::generate();
        let activates = now.saturating_add(publish_delay_ms);
        let mut writes = vec![seal_record(kek, &new, now, activates, None)?];
        // Any key still signing or scheduled (an earlier rotation not yet active)
        // stops at `activates`; its tokens are honoured until they expire.
        let retires = activates.saturating_add(longest_token_ms);
        let mut retiring = Vec::new();
        let read: Vec<String> = records.iter().map(|r| r.kid.clone()).collect();
        for r in records
            .into_iter()
            .filter(|r| r.retires_at.is_none_or(|t| t > retires))
        {
            // Resealed: the schedule is part of what the seal binds.
            let key = self
                .all()
                .iter()
                .find(|k| k.kid == r.kid)
                .and_then(|k| k.signing.clone())
                .ok_or_else(|| KeyRingError::Record {
                    kid: r.kid.clone(),
                    why: "not loaded".into(),
                })?;
            retiring.push(r.kid.clone());
            writes.push(seal_record(
                kek,
                &key,
                r.created_at,
                r.activates_at,
                Some(retires),
            )?);
        }
        let rotation = Rotation {
            new_kid: new.kid().to_owned(),
            activates_at: activates,
            retired: retiring,
            retires_at: retires,
            previous: old.map(|k| k.kid().to_owned()),
        };
        store
            .commit(WriteBatch {
                keys: writes,
                // Two rotations at once: the second finds the ring changed and fails.
                keys_expected: Some(read),
                events: vec![ring_event(
                    now,
                    "key.rotated",
                    actor,
                    json!({
                        "kid": rotation.new_kid,
                        "alg": ALG,
                        "activates_at": activates,
                        "retiring": rotation.retired,
                        "retires_at": retires,
                    }),
                )],
                ..Default::default()
            })
            .await?;
        self.reload(store).await?;
        Ok(rotation)
    }
}

/// What a rotation did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rotation {
    pub new_kid: String,
    pub activates_at: i64,
    pub previous: Option<String>,
    pub retired: Vec<String>,
    pub retires_at: i64,
}

/// What a sealed key is bound to (AEAD associated data): its id and its schedule.
/// A database writer without the key-encryption key cannot move a sealed key to
/// another row, keep a retired key published or bring a key forward: the record
/// no longer opens, and the ring refuses it.
fn binding(kid: &str, activates_at: i64, retires_at: Option<i64>) -> Vec<u8> {
    let retires = retires_at.map_or(String::new(), |r| r.to_string());
    format!("lapse-signing-key/v1\n{kid}\n{activates_at}\n{retires}").into_bytes()
}

fn seal_record(
    kek: &Kek,
    key: &SigningKey,
    now: i64,
    activates_at: i64,
    retires_at: Option<i64>,
) -> Result<KeyRecord, KeyRingError> {
    let public = serde_json::to_vec(key.jwk()).map_err(|e| KeyRingError::Record {
        kid: key.kid().to_owned(),
        why: e.to_string(),
    })?;
    Ok(KeyRecord {
        kid: key.kid().to_owned(),
        alg: ALG.into(),
        public,
        sealed: kek.seal(
            &binding(key.kid(), activates_at, retires_at),
            &key.secret_bytes(),
        )?,
        created_at: now,
        activates_at,
        retires_at,
    })
}

/// An audit event about the ring as a whole (no grant).
fn ring_event(at: i64, kind: &str, actor: &str, data: serde_json::Value) -> AuditEvent {
    AuditEvent {
        at,
        kind: kind.to_owned(),
        grant_id: None,
        actor: actor.to_owned(),
        data,
    }
}

fn now_ms() -> i64 {
    use lapse_core::Clock;
    lapse_core::SystemClock.now().millis()
}

/// The ring signs audit checkpoints with whichever key signs now.
impl AuditSigner for KeyRing {
    fn sign(&self, message: &[u8]) -> (String, Vec<u8>) {
        // No key signs only if every key retired, which rotation never leaves; an
        // empty signature then fails verification loudly rather than silently.
        self.current()
            .map(|k| (k.kid().to_owned(), k.sign(message)))
            .unwrap_or_default()
    }

    fn verifies(&self, kid: &str, message: &[u8], signature: &[u8]) -> bool {
        self.any(kid)
            .is_some_and(|p| p.verify(message, signature).is_ok())
    }
}
