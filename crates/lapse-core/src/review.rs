//! The mandatory review of a break-glass grant: opened when the grant is issued
//! (with the requester's written justification), closed only by a person with a
//! verdict. It outlives the grant: access may have ended long before anyone looked.

mod record;

pub use record::{Review, Verdict};

use crate::clock::Timestamp;
use crate::grant::{Grant, LifecycleError};

impl Grant {
    /// Closes the grant's break-glass review with a verdict; in any grant state.
    pub fn close_review(
        mut self,
        now: Timestamp,
        by: &str,
        verdict: Verdict,
        note: &str,
    ) -> Result<Self, LifecycleError> {
        let id = self.id;
        let review = self
            .review
            .as_mut()
            .ok_or(LifecycleError::NoReview { id })?;
        if !review.is_open() {
            return Err(LifecycleError::ReviewClosed { id });
        }
        review.closed_at = Some(now);
        review.closed_by = Some(by.to_owned());
        review.verdict = Some(verdict);
        review.note = note.to_owned();
        self.version += 1;
        Ok(self)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::grant::tests_support::{new_grant_with, t};

    #[test]
    fn a_review_closes_once_with_a_verdict() {
        let g = Grant::issue(new_grant_with(600, None, &["admin"]), "j".into()).unwrap();
        assert!(matches!(
            g.clone()
                .close_review(t(1001), "alice", Verdict::Justified, ""),
            Err(LifecycleError::NoReview { .. })
        ));
        let mut g = g;
        g.review = Some(Review::open("prod is down, INC-1", t(1000)));
        let ended = g.revoke(t(1010), "ops", "done").unwrap();
        let closed = ended
            .close_review(t(2000), "alice", Verdict::Justified, "INC-1 confirmed")
            .unwrap();
        let r = closed.review.clone().unwrap();
        assert!(!r.is_open());
        assert_eq!(r.verdict, Some(Verdict::Justified));
        assert!(matches!(
            closed.close_review(t(2001), "bob", Verdict::Unjustified, ""),
            Err(LifecycleError::ReviewClosed { .. })
        ));
    }
}
