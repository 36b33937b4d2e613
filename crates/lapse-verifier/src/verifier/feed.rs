//! Following the broker's revocation feed (`GET /v1/feed`, server-sent events).

use super::Verifier;
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// One grant ending, as the broker's feed sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FeedEntry {
    pub seq: u64,
    pub at: i64,
    pub grant_id: String,
    pub state: String,
    pub audience: String,
    #[serde(default)]
    pub jti: Option<String>,
    /// Expiry of the grant's newest token (unix ms): the gate forgets the entry after.
    pub exp: i64,
    #[serde(default)]
    pub reason: String,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Verifier {
    /// Records a feed entry (a grant that ended). Only a `head` marks the feed as
    /// heard: a gate replaying old entries has not caught up yet.
    pub fn apply(&self, e: &FeedEntry, now_ms: i64) {
        if let Ok(mut ended) = self.ended.write() {
            ended
                .by_grant
                .insert(e.grant_id.clone(), (e.state.clone(), e.exp));
            // Entries whose tokens have expired on their own can go.
            if ended.by_grant.len() % 1024 == 0 {
                lapse_core::table::prune(&mut ended.by_grant, |_, (_, exp)| *exp > now_ms);
            }
        }
        self.seq.fetch_max(e.seq, Ordering::AcqRel);
    }

    /// Follows the feed until the process ends: connects, applies every entry after
    /// the last one applied (`Last-Event-ID`), notes heartbeats, and reconnects with
    /// backoff when the stream breaks or shows a gap.
    pub async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.follow_once().await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, resume_after = self.seq(), "revocation feed interrupted; reconnecting");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One connection: returns when it ends.
    pub async fn follow_once(&self) -> Result<(), String> {
        let url = format!("{}/v1/feed", self.cfg.broker.trim_end_matches('/'));
        let mut resp = self
            .http
            .get(&url)
            .bearer_auth(&self.cfg.token)
            .header("Accept", "text/event-stream")
            .header("Last-Event-ID", self.seq().to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let mut buf = String::new();
        // A stream that stops talking (no heartbeat) is as good as cut.
        let idle = self.cfg.staleness.max(Duration::from_secs(2));
        loop {
            let chunk = tokio::time::timeout(idle, resp.chunk())
                .await
                .map_err(|_| "no data from the feed".to_owned())?
                .map_err(|e| e.to_string())?;
            let Some(chunk) = chunk else {
                return Err("the broker closed the feed".into());
            };
            buf.push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                self.event(&block)?;
            }
        }
    }

    /// Handles one server-sent event block.
    fn event(&self, block: &str) -> Result<(), String> {
        let mut kind = "message";
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        let now = now_ms();
        match kind {
            "grant.ended" => {
                let e: FeedEntry =
                    serde_json::from_str(&data).map_err(|e| format!("bad feed entry: {e}"))?;
                let last = self.seq();
                if e.seq <= last {
                    return Ok(());
                }
                // The broker's sequence is gap-free; a gap means something was
                // missed, so resume from what was applied.
                if e.seq != last + 1 {
                    return Err(format!("gap in the feed: {last} then {}", e.seq));
                }
                self.apply(&e, now);
            }
            "head" => {
                #[derive(Deserialize)]
                struct Head {
                    seq: u64,
                }
                let h: Head = serde_json::from_str(&data).map_err(|e| format!("bad head: {e}"))?;
                if h.seq > self.seq() {
                    return Err(format!(
                        "behind the feed: at {}, head {}",
                        self.seq(),
                        h.seq
                    ));
                }
                self.heard(now);
            }
            _ => {}
        }
        Ok(())
    }
}
