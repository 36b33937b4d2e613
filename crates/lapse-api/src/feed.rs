//! The revocation feed gates follow: `GET /v1/feed`.
//!
//! Entries come from the store (written in the commit that ends the grant), so the
//! feed never says more or less than what is durable, and a gate that reconnects
//! with `Last-Event-ID` (or `?after=`) gets exactly what it missed, in order. A
//! commit that ends a grant wakes the streams at once; a `head` event every
//! second tells a quiet gate the feed is alive and how far it goes, which is what
//! its staleness bound measures.

use crate::error::ApiError;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use lapse_broker::BrokerError;
use lapse_broker::Lapse;
use lapse_broker::config::Role;
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// How often a stream says it is alive when nothing ends.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
const BATCH: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, BrokerError> {
    match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            BrokerError::InvalidRequest("`Last-Event-ID` must be a sequence number".into())
        }),
    }
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json") && !a.contains("text/event-stream"))
}

/// `GET /v1/feed`: server-sent events (`grant.ended` with `id:` = sequence, and
/// `head`), or with `Accept: application/json` one page of entries.
pub async fn feed(
    State(s): State<Arc<Lapse>>,
    headers: HeaderMap,
    q: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let op = s.operator(crate::extract::authorization(&headers))?;
    if op.require(Role::Gate).is_err() {
        op.require(Role::Read)?;
    }
    let Query(q) = q.map_err(|e| BrokerError::InvalidRequest(e.body_text()))?;
    let after = match last_event_id(&headers)? {
        Some(id) => id,
        None => q.after.unwrap_or(0),
    };
    if wants_json(&headers) {
        let entries = s
            .store
            .feed(after, q.limit.unwrap_or(BATCH).min(10_000))
            .await?;
        let head = s.store.feed_head().await?;
        let mut r = (
            StatusCode::OK,
            axum::Json(json!({ "entries": entries, "head": head })),
        )
            .into_response();
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        return Ok(r);
    }
    // Fail before the stream starts if the store cannot be read.
    s.store.feed_head().await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(pump(s.clone(), after, tx));
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// Sends entries after `after` as they are committed, and a `head` heartbeat,
/// until the client goes away.
async fn pump(s: Arc<Lapse>, mut after: u64, tx: tokio::sync::mpsc::Sender<Event>) {
    let mut woken = s.feed_bumps.subscribe();
    let mut closing = s.closing.subscribe();
    loop {
        if *closing.borrow_and_update() {
            return;
        }
        // Mark what has been seen before reading, so a commit during the read
        // wakes the next wait instead of being missed.
        woken.borrow_and_update();
        let entries = match s.store.feed(after, BATCH).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "revocation feed: store read failed; closing the stream");
                return;
            }
        };
        let full = entries.len() == BATCH;
        for e in entries {
            after = e.seq;
            let ev = Event::default()
                .id(e.seq.to_string())
                .event("grant.ended")
                .json_data(&e);
            let Ok(ev) = ev else { continue };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        // `seq`: what this stream has sent; `store`: how far the store goes (a
        // gate ahead of it is following a store that went back, e.g. a restore).
        let store = s.store.feed_head().await.unwrap_or(after);
        let head = Event::default()
            .event("head")
            .json_data(json!({ "seq": after, "store": store, "at": s.now().millis() }));
        if let Ok(h) = head
            && tx.send(h).await.is_err()
        {
            return;
        }
        tokio::select! {
            _ = woken.changed() => {}
            () = tokio::time::sleep(HEARTBEAT) => {}
            () = tx.closed() => return,
            _ = closing.changed() => return,
        }
    }
}
