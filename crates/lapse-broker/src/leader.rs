//! The leader term: which replica runs the sweeper, cleanup and reconciler. The
//! store's lease decides; this process remembers the term it holds, and when it
//! lapses by this process's own monotonic clock.

use lapse_store::{Store, StoreError};
use std::time::{Duration, Instant};

tokio::task_local! {
    /// The leader term a leader-only pass runs in (see [`Lapse::run_as_leader`]).
    static LEADER_FENCE: u64;
}

/// A leader term as this replica holds it.
#[derive(Debug, Clone, Copy)]
struct Term {
    generation: u64,
    /// When it lapses by this process's monotonic clock.
    until: std::time::Instant,
}

/// The term this replica holds, if any.
#[derive(Debug, Default)]
pub struct Leadership {
    held: std::sync::Mutex<Option<Term>>,
}

impl Leadership {
    /// Takes or renews the leader lease (`leader_lease`) and remembers the term.
    /// The term is taken to lapse `leader_lease` after the request was sent —
    /// never later than the store's own lease, which starts when the store
    /// answers — so a process that stalls stops acting as leader, by its own
    /// monotonic clock, no later than another may take over.
    pub async fn lead(&self, store: &dyn Store, lease: Duration) -> Result<bool, StoreError> {
        let asked = Instant::now();
        let answer = store.try_lead(lease).await;
        let term = match &answer {
            Ok(Some(generation)) => Some(Term {
                generation: *generation,
                until: asked + lease,
            }),
            _ => None,
        };
        let was = {
            let mut held = self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *held, term)
        };
        match (&was, &term) {
            (None, Some(t)) => {
                tracing::info!(
                    generation = t.generation,
                    "this replica now runs the sweeper and reconciler"
                );
            }
            (Some(w), Some(t)) if w.generation != t.generation => {
                tracing::warn!(
                    generation = t.generation,
                    "the leader term lapsed and a new one began"
                );
            }
            (Some(_), None) => {
                tracing::warn!("this replica no longer runs the sweeper and reconciler");
            }
            _ => {}
        }
        Ok(answer?.is_some())
    }

    /// The generation of the leader term this replica holds now, if it holds one
    /// that has not lapsed: what leader-only writes carry as their fence.
    pub fn fence(&self) -> Option<u64> {
        let held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.filter(|t| Instant::now() < t.until)
            .map(|t| t.generation)
    }

    /// Whether a leader-only pass may still act: outside one, always; inside, while
    /// the term it began in has not lapsed. For actions on targets, which the
    /// store's fence cannot refuse.
    pub(crate) fn still_in_term(&self) -> bool {
        LEADER_FENCE
            .try_with(|f| *f)
            .map_or(true, |f| self.fence() == Some(f))
    }

    /// Runs a leader-only pass in the term this replica holds, or skips it (`None`)
    /// when it holds none. Every commit of the pass carries the term as its fence:
    /// if the process stalls mid-pass and another replica takes over, what the
    /// pass writes after it wakes is refused.
    pub async fn run<T>(&self, pass: impl Future<Output = T>) -> Option<T> {
        let generation = self.fence()?;
        Some(LEADER_FENCE.scope(generation, pass).await)
    }
}

/// The term of the leader-only pass this task runs in, if it runs in one: what
/// every commit of the pass carries as its fence.
pub fn current_fence() -> Option<u64> {
    LEADER_FENCE.try_with(|f| *f).ok()
}
