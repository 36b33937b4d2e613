//! The broker's HTTP layer in process, as a client on the network reaches it: the
//! token endpoint's form body, native JSON access requests, introspection,
//! revocation, signals, usage reports, renewals — with a DPoP header. Whatever
//! arrives, the answer is a precise 4xx (or a 2xx), never a panic or a 5xx.
//!
//! Input: the first byte picks the endpoint; up to the first newline is the DPoP
//! header; the rest is the body.
#![no_main]

use axum::body::Body;
use axum::http::{Request, header};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, LazyLock};
use tower::ServiceExt;

struct Setup {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    admin: String,
    _dir: tempfile::TempDir,
}

static SETUP: LazyLock<Setup> = LazyLock::new(|| {
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (router, admin) = rt.block_on(async {
        let addr = "127.0.0.1:7800".parse().expect("addr");
        let (mut cfg, _, admin) =
            lapse_server::dev::prepare(&dir.path().join("data"), addr).expect("dev config");
        cfg.limits.token_per_source = lapse_broker::limits::Rate::off();
        cfg.limits.token_per_workload = lapse_broker::limits::Rate::off();
        let lapse = lapse_server::build(cfg, Arc::new(lapse_core::SystemClock))
            .await
            .expect("broker");
        (lapse_api::router(lapse, lapse_console::routes(axum::Router::new())), admin)
    });
    Setup {
        rt,
        router,
        admin,
        _dir: dir,
    }
});

const ENDPOINTS: &[(&str, &str, &str)] = &[
    ("/oauth/token", "application/x-www-form-urlencoded", ""),
    ("/v1/access-requests", "application/json", ""),
    (
        "/oauth/introspect",
        "application/x-www-form-urlencoded",
        "admin",
    ),
    ("/oauth/revoke", "application/x-www-form-urlencoded", ""),
    ("/v1/signals", "application/json", "admin"),
    ("/v1/usage", "application/json", "admin"),
    (
        "/v1/grants/gr_0123456789abcdef0123456789abcdef/renew",
        "application/json",
        "dpop",
    ),
    (
        "/v1/approvals/gr_0123456789abcdef0123456789abcdef/approve",
        "application/json",
        "admin",
    ),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (path, content_type, auth) = ENDPOINTS[usize::from(pick) % ENDPOINTS.len()];
    let (dpop, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (&[][..], rest),
    };
    let s = &*SETUP;
    let mut req = Request::post(path).header(header::CONTENT_TYPE, content_type);
    if let Ok(v) = axum::http::HeaderValue::from_bytes(dpop) {
        req = req.header("DPoP", v.clone());
        if auth == "dpop" {
            req = req.header(header::AUTHORIZATION, [b"DPoP ".as_slice(), dpop].concat());
        }
    }
    if auth == "admin" {
        req = req.header(header::AUTHORIZATION, format!("Bearer {}", s.admin));
    }
    let Ok(mut req) = req.body(Body::from(body.to_vec())) else {
        return;
    };
    req.extensions_mut().insert(axum::extract::ConnectInfo(
        "192.0.2.1:40000"
            .parse::<std::net::SocketAddr>()
            .expect("addr"),
    ));
    let resp =
        s.rt.block_on(s.router.clone().oneshot(req))
            .expect("the router is infallible");
    assert!(
        resp.status().as_u16() < 500,
        "{path} answered {}",
        resp.status()
    );
});
