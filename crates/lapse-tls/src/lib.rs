//! TLS on Lapse's listeners, the broker's and the gate's (rustls, TLS 1.3 and 1.2):
//! certificate chain and key from PEM files, reloaded when the files change (a
//! renewed certificate is used by new connections without a restart); optionally
//! client certificates, verified against a trust bundle — a workload's X.509-SVID,
//! whose SPIFFE ID can stand in for an identity token in a token exchange, or the
//! proxy in front of a gate.

use arc_swap::ArcSwap;
use lapse_core::WorkloadIdentity;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_rustls::TlsAcceptor;

/// `[tls]` in `lapse.toml` and `gate.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM trust bundle for client certificates (the SPIFFE trust domain's X.509
    /// bundle). Set, clients may present an X.509-SVID.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse connections without a client certificate (needs `client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: cannot read `{path}`: {why}")]
    Read { path: String, why: String },
    #[error("TLS: {0}")]
    Config(String),
}

/// The verified client certificate of a connection (its leaf), for handlers.
#[derive(Debug, Clone)]
pub struct ClientCert(pub Arc<CertificateDer<'static>>);

impl ClientCert {
    /// RFC 8705 `x5t#S256`: base64url SHA-256 of the DER certificate.
    pub fn thumbprint(&self) -> String {
        thumbprint(self.0.as_ref())
    }

    /// The workload an X.509-SVID names: exactly one URI SAN, a `spiffe://` ID.
    /// The chain was verified by the TLS layer against `client_ca`.
    pub fn svid(&self) -> Result<WorkloadIdentity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(self.0.as_ref())
            .map_err(|e| format!("the client certificate does not parse: {e}"))?;
        let uris: Vec<String> = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let [id] = uris.as_slice() else {
            return Err(format!(
                "an X.509-SVID has exactly one URI SAN; this certificate has {}",
                uris.len()
            ));
        };
        let url = url::Url::parse(id).map_err(|e| format!("SPIFFE ID `{id}`: {e}"))?;
        let domain = url.host_str().unwrap_or_default().to_owned();
        if url.scheme() != "spiffe"
            || domain.is_empty()
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
            || url.port().is_some()
        {
            return Err(format!("`{id}` is not a SPIFFE ID"));
        }
        let mut claims = BTreeMap::new();
        claims.insert("x5t#S256".to_owned(), self.thumbprint());
        claims.insert("spiffe_trust_domain".to_owned(), domain.clone());
        Ok(WorkloadIdentity {
            id: id.clone(),
            issuer: format!("spiffe://{domain}"),
            subject: id.clone(),
            claims,
        })
    }
}

/// RFC 8705 `x5t#S256` of a DER certificate.
pub fn thumbprint(der: &[u8]) -> String {
    lapse_token::b64::encode(sha2::Sha256::digest(der))
}

/// The `x5t#S256` of the first certificate in `pem`; `None` when it holds none.
pub fn thumbprint_of_pem(pem: &str) -> Option<String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    Some(thumbprint(der.as_ref()))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

fn server_config(cfg: &TlsConfig) -> Result<rustls::ServerConfig, TlsError> {
    let bad = |path: &Path, why: String| TlsError::Read {
        path: path.display().to_string(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&cfg.cert)?)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&cfg.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(&cfg.cert, "no certificate in it".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&cfg.key)?)
        .map_err(|e| bad(&cfg.key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &cfg.client_ca {
        None if cfg.require_client_cert => {
            return Err(TlsError::Config(
                "`require_client_cert` needs `client_ca`".into(),
            ));
        }
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(ca)?) {
                let c = c.map_err(|e| bad(ca, e.to_string()))?;
                roots.add(c).map_err(|e| bad(ca, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(bad(ca, "no certificate in the trust bundle".into()));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if cfg.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The listener's TLS: the current acceptor, swapped when the files change.
pub struct Tls {
    cfg: TlsConfig,
    acceptor: ArcSwap<TlsAcceptor>,
}

type Stamp = Vec<Option<(u64, SystemTime)>>;

fn stamp(cfg: &TlsConfig) -> Stamp {
    [Some(&cfg.cert), Some(&cfg.key), cfg.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?))
        })
        .collect()
}

impl Tls {
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let config = server_config(cfg)?;
        Ok(Self {
            cfg: cfg.clone(),
            acceptor: ArcSwap::from_pointee(TlsAcceptor::from(Arc::new(config))),
        })
    }

    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// Whether clients may authenticate with a certificate.
    pub fn client_certs(&self) -> bool {
        self.cfg.client_ca.is_some()
    }

    /// Reloads the certificate, key and trust bundle when their files change; a
    /// change that does not load is logged and the last good configuration stays.
    async fn watch(self: Arc<Self>, period: Duration) {
        let mut last = stamp(&self.cfg);
        loop {
            tokio::time::sleep(period).await;
            let now = stamp(&self.cfg);
            if now == last {
                continue;
            }
            last = now;
            match server_config(&self.cfg) {
                Ok(c) => {
                    self.acceptor
                        .store(Arc::new(TlsAcceptor::from(Arc::new(c))));
                    tracing::info!("TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload refused; keeping the current certificate")
                }
            }
        }
    }
}

/// The accept loop of a listener, with TLS (`Some`) or without: the TLS
/// handshake bounded to 10 s, then HTTP/1.1 with the request head bounded to
/// 10 s (a client that trickles its headers is cut off), the peer address
/// (`ConnectInfo`) and any verified client certificate ([`ClientCert`]) in each
/// request's extensions. The certificate files are watched for changes while it
/// serves ([`Tls::watch`]). When `shutdown` resolves it stops accepting, calls
/// `on_stop` (to end long-lived streams) and lets requests in flight finish, for
/// up to 10 s.
pub async fn serve(
    tls: Option<Arc<Tls>>,
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_stop: impl FnOnce(),
) -> std::io::Result<()> {
    let reload = tls
        .clone()
        .map(|t| AbortOnDrop(tokio::spawn(t.watch(Duration::from_secs(2)))));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let Some(acceptor) = acceptor else {
                return connection(tcp, peer, None, app, watcher).await;
            };
            let stream =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| ClientCert(Arc::new(c.clone().into_owned())));
            connection(stream, peer, cert, app, watcher).await;
        });
    }
    on_stop();
    drop(listener);
    drop(reload);
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// HTTP/1.1 on one accepted (and, with TLS, handshaken) connection.
async fn connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    cert: Option<ClientCert>,
    app: axum::Router,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        if let Some(c) = &cert {
            req.extensions_mut().insert(c.clone());
        }
        let mut app = app.clone();
        async move { tower::Service::call(&mut app, req.map(axum::body::Body::new)).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
