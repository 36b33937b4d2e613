//! The admin connection: one multiplexed connection, opened on first use (a
//! Redis that is down when Lapse starts does not stop the start) and again after
//! it broke, with bounded connect and response times, so a dead target fails
//! fast as [`ProviderError::Unavailable`].
//!
//! Not `redis::aio::ConnectionManager`: when its reconnection fails for a reason
//! other than I/O (the admin user disabled or its password changed during an
//! outage), it keeps answering with that failure (redis 1.8), so the provider
//! would never recover once the operator fixed the account. Here a connection
//! that failed in any way but a server's error reply is dropped, and the next
//! command opens a new one.

use crate::ProviderError;
use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, RedisError, Value};
use std::time::Duration;
use tokio::sync::Mutex;

/// Connecting (TCP, TLS, AUTH) and each reply are bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub struct Admin {
    client: Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    target: String,
    /// Never shown in an error: the admin URL and its password.
    secrets: Vec<String>,
}

impl Admin {
    pub fn new(client: Client, target: String, secrets: Vec<String>) -> Self {
        Self {
            client,
            conn: Mutex::new(None),
            target,
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
        }
    }

    /// `message` without any secret of the admin connection, nor `more`.
    pub fn scrub(&self, message: String, more: &[&str]) -> String {
        let mut m = message;
        for s in self
            .secrets
            .iter()
            .map(String::as_str)
            .chain(more.iter().copied())
        {
            if !s.is_empty() {
                m = m.replace(s, "<redacted>");
            }
        }
        m
    }

    fn unavailable(&self, message: String) -> ProviderError {
        ProviderError::Unavailable {
            target: self.target.clone(),
            message: self.scrub(message, &[]),
        }
    }

    async fn conn(&self) -> Result<MultiplexedConnection, ProviderError> {
        let mut held = self.conn.lock().await;
        if let Some(c) = held.as_ref() {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        // The library bounds each step; this bounds them all.
        let c = tokio::time::timeout(
            TIMEOUT * 2,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| {
            self.unavailable(format!(
                "admin connection timed out after {} s",
                (TIMEOUT * 2).as_secs()
            ))
        })?
        .map_err(|e| self.unavailable(format!("admin connection: {e}")))?;
        *held = Some(c.clone());
        Ok(c)
    }

    /// Runs `cmd`. A server's error reply is [`ProviderError::Step`] (`step`
    /// names what failed); anything else drops the connection and is
    /// [`ProviderError::Unavailable`]. `more` are further strings the error
    /// must not show.
    pub async fn run_scrubbed(
        &self,
        cmd: &Cmd,
        step: &'static str,
        more: &[&str],
    ) -> Result<Value, ProviderError> {
        let mut c = self.conn().await?;
        match cmd.query_async::<Value>(&mut c).await {
            Ok(v) => Ok(v),
            Err(e) if is_server_reply(&e) => Err(ProviderError::Step {
                target: self.target.clone(),
                step,
                message: self.scrub(server_words(&e), more),
            }),
            Err(e) => {
                *self.conn.lock().await = None;
                Err(ProviderError::Unavailable {
                    target: self.target.clone(),
                    message: self.scrub(format!("{step}: {e}"), more),
                })
            }
        }
    }

    pub async fn run(&self, cmd: &Cmd, step: &'static str) -> Result<Value, ProviderError> {
        self.run_scrubbed(cmd, step, &[]).await
    }
}

/// Whether Redis answered with an error (as opposed to the connection failing).
fn is_server_reply(e: &RedisError) -> bool {
    matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
}

/// A server's error as Redis wrote it (`NOPERM this user has no …`).
fn server_words(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// Whether a step failed because the server said `words` (e.g. `No such user`).
pub fn said(e: &ProviderError, words: &str) -> bool {
    matches!(e, ProviderError::Step { message, .. } if message.contains(words))
}
