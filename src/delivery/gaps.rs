//! Ordered keys stuck behind a lost sequence: found by the worker, and parked.
//!
//! A key's records wait for their predecessor. When the predecessor's job is gone (deleted by
//! hand) or dead (it could not be read), nothing will ever deliver it, and the key would wait
//! for good with nothing but the oldest event's age to show it. So the worker notes the keys
//! whose next record waits behind a sequence after their delivered one; a key that keeps
//! waiting on the same delivered sequence for [`WorkerConfig::gap_check_after`] is checked
//! (a scan of the jobs that mention it): if no live job holds its next sequence, the key is
//! parked with the reason, and `journaled status`, the parked-keys gauge and `retry --key` /
//! `skip --key` take it from there. Checks are rare: one key at a time, at most one every
//! tenth of that delay per worker, each key at most once per delay.
//!
//! [`WorkerConfig::gap_check_after`]: crate::WorkerConfig::gap_check_after

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::Backend;

/// Keys noted at most; past it the notes start again (they only pace the checks).
const MAX_NOTED: usize = 10_000;

/// A (stream, key) whose next record waits behind a sequence after `delivered`.
pub(crate) type Waiting = (String, String, i64);

struct Noted {
    delivered: i64,
    /// Since when it has waited on this delivered sequence.
    since: Instant,
    /// When a batch last reported it waiting.
    seen: Instant,
    checked: Option<Instant>,
}

/// What a worker knows of its keys that wait behind a gap.
#[derive(Default)]
pub(crate) struct Gaps {
    noted: HashMap<(String, String), Noted>,
    next_check: Option<Instant>,
}

impl Gaps {
    /// Notes keys a batch left waiting; returns the key to check now, if any: the one that
    /// has waited longest on the same delivered sequence, for at least `after`.
    ///
    /// `may_check` is false while a check runs, or while the worker is held back (an outage,
    /// a configuration error): then every waiting key's predecessor is likely live, backing
    /// off, and a check would scan the job table for nothing.
    pub(crate) fn note(
        &mut self,
        waiting: Vec<Waiting>,
        now: Instant,
        after: Duration,
        may_check: bool,
    ) -> Option<Waiting> {
        if after.is_zero() {
            return None;
        }
        // A key not reported for a while moved on (or its records went to another worker).
        self.noted
            .retain(|_, n| now.saturating_duration_since(n.seen) <= after);
        for (stream, key, delivered) in waiting {
            if self.noted.len() >= MAX_NOTED
                && !self.noted.contains_key(&(stream.clone(), key.clone()))
            {
                continue; // full: the keys noted first, the likeliest stuck, keep their place
            }
            let noted = self.noted.entry((stream, key)).or_insert(Noted {
                delivered,
                since: now,
                seen: now,
                checked: None,
            });
            if noted.delivered != delivered {
                noted.delivered = delivered;
                noted.since = now;
                noted.checked = None;
            }
            noted.seen = now;
        }
        if !may_check || self.next_check.is_some_and(|at| now < at) {
            return None;
        }
        let (key, noted) = self
            .noted
            .iter_mut()
            .filter(|(_, n)| {
                now.saturating_duration_since(n.since) >= after
                    && n.checked
                        .is_none_or(|at| now.saturating_duration_since(at) >= after)
            })
            .min_by_key(|(_, n)| n.since)?;
        noted.checked = Some(now);
        self.next_check = Some(now + after / 10);
        Some((key.0.clone(), key.1.clone(), noted.delivered))
    }
}

/// Checks one waiting key in a task of its own (one at a time per worker): parks it when no
/// live job holds its next sequence.
pub(crate) fn check<DB: Backend>(pool: &sqlx::Pool<DB>, running: &Arc<AtomicBool>, key: Waiting) {
    if running.swap(true, Ordering::AcqRel) {
        return; // the check in flight paces the next
    }
    /// Clears `running` however the check ends.
    struct Done(Arc<AtomicBool>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.store(false, Ordering::Release);
        }
    }
    let (pool, done) = (pool.clone(), Done(running.clone()));
    tokio::spawn(async move {
        let _done = done;
        let (stream, partition_key, delivered) = key;
        match crate::store::ordering::park_if_missing(&pool, &stream, &partition_key, delivered)
            .await
        {
            Ok(Some(parked)) => tracing::error!(
                stream,
                key = partition_key,
                sequence = parked.sequence,
                reason = %parked.reason,
                "ordered key parked: its next record is lost"
            ),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, stream, key = partition_key, "could not check a waiting ordered key; checking again later")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str, delivered: i64) -> Waiting {
        ("s".into(), k.into(), delivered)
    }

    #[test]
    fn a_key_is_checked_once_it_waited_long_enough_on_the_same_position() {
        let after = Duration::from_secs(10);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut gaps = Gaps::default();
        assert_eq!(
            gaps.note(vec![key("a", 3), key("b", 0)], at(0), after, true),
            None
        );
        assert_eq!(
            gaps.note(vec![key("a", 3), key("b", 1)], at(5), after, true),
            None
        );
        // `a` waited 10 s on 3; `b` moved at 5 s.
        assert_eq!(
            gaps.note(vec![key("a", 3), key("b", 1)], at(10), after, true),
            Some(key("a", 3))
        );
        // Paced: nothing for a tenth of the delay, and `a` not again for the whole delay.
        assert_eq!(
            gaps.note(vec![key("a", 3), key("b", 1)], at(10), after, true),
            None
        );
        assert_eq!(
            gaps.note(vec![key("a", 3), key("b", 1)], at(15), after, true),
            Some(key("b", 1))
        );
        assert_eq!(gaps.note(vec![key("a", 3)], at(19), after, true), None);
        assert_eq!(
            gaps.note(vec![key("a", 3)], at(20), after, true),
            Some(key("a", 3))
        );
        // Not reported for longer than the delay: forgotten, its wait starts again.
        assert_eq!(gaps.note(vec![key("a", 3)], at(40), after, true), None);
        assert_eq!(gaps.note(vec![], at(45), after, true), None);
        assert_eq!(
            gaps.note(vec![key("a", 3)], at(50), after, true),
            Some(key("a", 3))
        );
        // Not while a check runs or the worker is held back; the wait is still noted.
        assert_eq!(gaps.note(vec![key("a", 3)], at(60), after, false), None);
        assert_eq!(
            gaps.note(vec![key("a", 3)], at(61), after, true),
            Some(key("a", 3))
        );
        // Zero turns checks off.
        assert_eq!(
            gaps.note(vec![key("c", 0)], at(500), Duration::ZERO, true),
            None
        );
    }
}
