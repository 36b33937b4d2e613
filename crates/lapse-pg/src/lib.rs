//! Connecting to PostgreSQL: the store's database and the targets of the database
//! credential provider.
//!
//! TLS is all or nothing. `sslmode=require`, `verify-ca` and `verify-full` all mean
//! TLS with the server's certificate verified (chain and host name, as libpq's
//! `verify-full`), against `sslrootcert` (a PEM file, as in libpq) or, without it,
//! the system's roots. `sslmode=disable`, or none, means no TLS. `prefer` and
//! `allow` are refused: TLS that quietly falls back to plaintext, or that is not
//! verified, protects against nobody who can see the traffic.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::sync::Arc;
use tokio_postgres::config::SslMode;

/// What every connection is made with.
pub type Tls = tokio_postgres_rustls::MakeRustlsConnect;

#[derive(Debug, thiserror::Error)]
pub enum PgConfigError {
    /// The connection string does not parse. It is never quoted (it may hold a
    /// password).
    #[error("the connection string does not parse: {0}")]
    Parse(String),
    #[error(
        "sslmode={0} is not supported: use sslmode=require (TLS, server verified) or sslmode=disable"
    )]
    SslMode(String),
    #[error("sslrootcert `{path}`: {why}")]
    RootCert { path: String, why: String },
}

/// Parses a connection string (a `postgres://` URL or libpq `key=value` pairs) and
/// builds the TLS connector it asks for.
pub fn config(conn: &str) -> Result<(tokio_postgres::Config, Tls), PgConfigError> {
    let (conn, sslmode, rootcert) = lift_tls_options(conn)?;
    let mut config: tokio_postgres::Config = conn
        .parse()
        .map_err(|e: tokio_postgres::Error| PgConfigError::Parse(e.to_string()))?;
    // Without TLS the connector is never used; it trusts nothing.
    let roots = match sslmode.as_deref() {
        None | Some("disable") => {
            config.ssl_mode(SslMode::Disable);
            rustls::RootCertStore::empty()
        }
        Some("require" | "verify-ca" | "verify-full") => {
            config.ssl_mode(SslMode::Require);
            roots(rootcert.as_deref())?
        }
        Some(other) => return Err(PgConfigError::SslMode(other.to_owned())),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| PgConfigError::Parse(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((
        config,
        tokio_postgres_rustls::MakeRustlsConnect::new(client),
    ))
}

/// Takes `sslmode` and `sslrootcert` out of the connection string (tokio-postgres
/// knows neither `verify-full` nor `sslrootcert`): the rest, and the two values.
type Lifted = (String, Option<String>, Option<String>);

fn lift_tls_options(conn: &str) -> Result<Lifted, PgConfigError> {
    if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        let mut url = url::Url::parse(conn).map_err(|e| PgConfigError::Parse(e.to_string()))?;
        let (mut mode, mut root) = (None, None);
        let rest: Vec<(String, String)> = url
            .query_pairs()
            .filter_map(|(k, v)| match k.as_ref() {
                "sslmode" => {
                    mode = Some(v.into_owned());
                    None
                }
                "sslrootcert" => {
                    root = Some(v.into_owned());
                    None
                }
                _ => Some((k.into_owned(), v.into_owned())),
            })
            .collect();
        if rest.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(rest);
        }
        return Ok((url.into(), mode, root));
    }
    // key=value pairs, separated by spaces (values with spaces are quoted; those
    // pass through untouched).
    let (mut mode, mut root) = (None, None);
    let rest: Vec<&str> = conn
        .split_whitespace()
        .filter(|kv| {
            if let Some(v) = kv.strip_prefix("sslmode=") {
                mode = Some(v.to_owned());
                false
            } else if let Some(v) = kv.strip_prefix("sslrootcert=") {
                root = Some(v.to_owned());
                false
            } else {
                true
            }
        })
        .collect();
    Ok((rest.join(" "), mode, root))
}

fn roots(rootcert: Option<&str>) -> Result<rustls::RootCertStore, PgConfigError> {
    let mut store = rustls::RootCertStore::empty();
    match rootcert {
        Some(path) => {
            let bad = |why: String| PgConfigError::RootCert {
                path: path.to_owned(),
                why,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            for c in CertificateDer::pem_slice_iter(&pem) {
                store
                    .add(c.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
            if store.is_empty() {
                return Err(bad("no certificate in it".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tls_options_come_out_of_urls_and_key_value_strings() {
        let (rest, mode, root) = lift_tls_options(
            "postgres://lapse:pw@db.internal:5432/lapse?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://lapse:pw@db.internal:5432/lapse?application_name=x"
        );
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (rest, mode, root) =
            lift_tls_options("host=db user=lapse sslmode=require sslrootcert=/ca.pem").unwrap();
        assert_eq!(rest, "host=db user=lapse");
        assert_eq!(
            (mode.as_deref(), root.as_deref()),
            (Some("require"), Some("/ca.pem"))
        );
        let (rest, mode, _) = lift_tls_options("postgres://db/lapse").unwrap();
        assert_eq!((rest.as_str(), mode), ("postgres://db/lapse", None));
    }

    #[test]
    fn tls_is_verified_or_off_never_opportunistic() {
        let (c, _) = config("postgres://db/lapse").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Disable);
        let (c, _) = config("postgres://db/lapse?sslmode=verify-full").unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Require);
        for mode in ["prefer", "allow", "bogus"] {
            let e = config(&format!("postgres://db/lapse?sslmode={mode}"))
                .err()
                .unwrap();
            assert!(matches!(e, PgConfigError::SslMode(_)), "{mode}: {e}");
        }
        let e = config("postgres://db/lapse?sslmode=require&sslrootcert=/nonexistent.pem")
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent.pem"), "{e}");
        // A parse error never quotes the string (it may hold a password).
        let e = config("postgres://u:secret@db:notaport/x").err().unwrap();
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
