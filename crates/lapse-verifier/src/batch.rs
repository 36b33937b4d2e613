//! Requests that arrive together are verified together.
//!
//! A DPoP proof's signature is most of a decision's cost, and Ed25519 signatures
//! checked as a batch cost about half as much each ([`Verifier::check_many`]). A
//! [`Batcher`] finds batches without waiting for them: a request joins a queue, and
//! while fewer workers run than the runtime has threads, it starts one. A worker
//! takes whatever is queued (at most [`MAX_BATCH`]), checks it in one call, answers,
//! and goes on until the queue is empty. When the gate is idle, every request is a
//! batch of one, checked at once; when every thread is busy, requests queue behind
//! the running batches and the next batch takes them all. No request waits for a
//! batch to fill, and nothing waits on a timer.

use crate::{Allowed, Denial, Request, Verifier};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::oneshot;

/// The most requests one worker checks in one call. Past 16, a bigger batch saves
/// little per signature (BENCHMARKS.md) and makes the requests in it wait longer.
pub const MAX_BATCH: usize = 16;

pub struct Batcher {
    verifier: Arc<Verifier>,
    queue: Mutex<Queue>,
    max_workers: usize,
    batches: AtomicU64,
    requests: AtomicU64,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    workers: usize,
}

struct Job {
    req: OwnedRequest,
    answer: oneshot::Sender<Result<Allowed, Denial>>,
}

/// A [`Request`] that owns its parts, to wait in the queue.
struct OwnedRequest {
    method: String,
    url: String,
    authorization: Option<String>,
    dpop: Vec<String>,
    action: String,
    client_cert: Option<String>,
    now_secs: i64,
}

impl OwnedRequest {
    fn of(r: &Request<'_>) -> Self {
        Self {
            method: r.method.to_owned(),
            url: r.url.to_owned(),
            authorization: r.authorization.map(str::to_owned),
            dpop: r.dpop.iter().map(|p| (*p).to_owned()).collect(),
            action: r.action.to_owned(),
            client_cert: r.client_cert.map(str::to_owned),
            now_secs: r.now_secs,
        }
    }

    fn view<'a>(&'a self, dpop: &'a [&'a str]) -> Request<'a> {
        Request {
            method: &self.method,
            url: &self.url,
            authorization: self.authorization.as_deref(),
            dpop,
            action: &self.action,
            client_cert: self.client_cert.as_deref(),
            now_secs: self.now_secs,
        }
    }
}

impl Batcher {
    /// A batcher whose workers number at most the current Tokio runtime's threads
    /// (one outside a runtime).
    pub fn new(verifier: Arc<Verifier>) -> Self {
        let threads = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .unwrap_or(1);
        Self {
            verifier,
            queue: Mutex::new(Queue::default()),
            max_workers: threads.max(1),
            batches: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// Batches checked and the requests in them, since the start.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.batches.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }

    /// [`Verifier::verify`], with the in-memory part done in a batch with whatever
    /// other requests are waiting.
    pub async fn verify(self: &Arc<Self>, req: &Request<'_>) -> Result<Allowed, Denial> {
        let (tx, rx) = oneshot::channel();
        let start_worker = {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.jobs.push(Job {
                req: OwnedRequest::of(req),
                answer: tx,
            });
            // Counted under the lock that the workers' emptiness check takes, so a
            // job is never left in the queue with no worker to come for it.
            let start = q.workers < self.max_workers;
            if start {
                q.workers += 1;
            }
            start
        };
        if start_worker {
            // Spawned, not run here: a worker must finish the jobs it took even if
            // the request that started it is dropped (its client went away).
            let me = Arc::clone(self);
            tokio::spawn(async move { me.work().await });
        }
        let first = rx
            .await
            .unwrap_or_else(|_| Err(Denial::Unavailable("the verification was cut short".into())));
        self.verifier.settle(req, first).await
    }

    async fn work(&self) {
        let mut shift = Shift {
            queue: &self.queue,
            on: true,
        };
        loop {
            let jobs: Vec<Job> = {
                let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if q.jobs.is_empty() {
                    q.workers = q.workers.saturating_sub(1);
                    shift.on = false;
                    return;
                }
                let n = q.jobs.len().min(MAX_BATCH);
                q.jobs.drain(..n).collect()
            };
            let proofs: Vec<Vec<&str>> = jobs
                .iter()
                .map(|j| j.req.dpop.iter().map(String::as_str).collect())
                .collect();
            let reqs: Vec<Request<'_>> = jobs
                .iter()
                .zip(&proofs)
                .map(|(j, p)| j.req.view(p))
                .collect();
            let answers = self.verifier.check_many(&reqs);
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.requests
                .fetch_add(u64::try_from(reqs.len()).unwrap_or(0), Ordering::Relaxed);
            drop(reqs);
            for (job, answer) in jobs.into_iter().zip(answers) {
                // The receiver is gone only if its request was dropped.
                let _ = job.answer.send(answer);
            }
            // Let the runtime read more requests: they make the next batch.
            tokio::task::yield_now().await;
        }
    }
}

/// A worker's place in the count, given back however the worker ends (a panic in a
/// check, the runtime shutting down), so the count never stays taken.
struct Shift<'a> {
    queue: &'a Mutex<Queue>,
    on: bool,
}

impl Drop for Shift<'_> {
    fn drop(&mut self) {
        if self.on {
            let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.workers = q.workers.saturating_sub(1);
            // The last worker gone early: whoever waits is answered (dropping a job
            // answers `Unavailable`) rather than left waiting for no one.
            if q.workers == 0 {
                q.jobs.clear();
            }
        }
    }
}
