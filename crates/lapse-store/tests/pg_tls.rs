#![allow(
    clippy::panic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]
//! The store over TLS to a PostgreSQL cluster of the test's own, with a server
//! certificate from a private CA made here: verified TLS works and is really used
//! (the server says so), a server the CA did not sign is refused rather than used
//! in plaintext, and opportunistic modes are refused.

use lapse_core::GrantState;
use lapse_store::{AuditSigner, PgStore, Store, StoreError};
use lapse_testkit::pg::PrivatePg;
use lapse_testkit::pki::{ca, server_leaf};
use std::sync::Arc;
use std::time::Duration;

struct Signer(lapse_token::SigningKey);
impl AuditSigner for Signer {
    fn sign(&self, m: &[u8]) -> (String, Vec<u8>) {
        (self.0.kid().to_owned(), self.0.sign(m))
    }
    fn verifies(&self, kid: &str, m: &[u8], sig: &[u8]) -> bool {
        kid == self.0.kid() && self.0.public().verify(m, sig).is_ok()
    }
}

async fn open(url: &str) -> Result<PgStore, StoreError> {
    let signer = Arc::new(Signer(lapse_token::SigningKey::generate()));
    PgStore::open(url, signer, Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_verified_tls_to_postgres_or_not_at_all() {
    let authority = ca("database ca");
    let pg = PrivatePg::init_with_tls(&server_leaf(&authority));
    let tmp = tempfile::tempdir().unwrap();
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&ca_file, &authority.pem).unwrap();
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);

    let store = open(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    ))
    .await
    .unwrap_or_else(|e| panic!("verified TLS: {e}"));
    assert_eq!(store.count(GrantState::Active).await.unwrap(), 0);

    // The server's view: every session Lapse opened is encrypted.
    let (admin, conn) = tokio_postgres::connect(&pg.admin_url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'lapse'",
            &[],
        )
        .await
        .unwrap();
    let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(tls >= 1, "no TLS session from lapse");
    assert_eq!(plain, 0, "a plaintext session from lapse");
    drop(store);

    // A server certificate from a CA the store was not told to trust: refused, and
    // not retried without TLS.
    let other = tmp.path().join("other.pem");
    std::fs::write(&other, ca("someone else").pem).unwrap();
    let e = open(&format!(
        "{base}?sslmode=require&sslrootcert={}",
        other.display()
    ))
    .await
    .err()
    .expect("an unverifiable server is refused");
    assert!(
        e.to_string().to_lowercase().contains("certificate"),
        "says why: {e}"
    );
    // Opportunistic TLS is not a mode Lapse offers.
    let e = open(&format!("{base}?sslmode=prefer")).await.err().unwrap();
    assert!(matches!(e, StoreError::Config(_)), "{e}");
    assert!(e.to_string().contains("sslmode=require"), "{e}");
}
