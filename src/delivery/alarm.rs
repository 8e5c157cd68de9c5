//! Failures that are not a job's fault — configuration errors and an unavailable service —
//! said once per interval at `error` level, however many jobs run into them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::sink::{ErrorClass, Failure};

/// What the worker is currently held back by, and when it last said so.
#[derive(Debug)]
pub(crate) struct Alarm {
    interval: Duration,
    /// Per kind: when it was first raised (since the last clear), last logged, and the latest
    /// failure of that kind.
    raised: Mutex<HashMap<(ErrorClass, String), Raised>>,
}

#[derive(Debug)]
struct Raised {
    since: Instant,
    logged: Option<Instant>,
    failure: Failure,
}

impl Alarm {
    /// Says each kind of problem at most once per `interval`.
    pub fn new(interval: Duration) -> Self {
        Alarm {
            interval,
            raised: Mutex::new(HashMap::new()),
        }
    }

    /// Reports a failure that is not the job's fault; logs it at `error` unless the same kind
    /// was logged less than an interval ago. Returns whether it logged.
    pub fn raise(&self, failure: &Failure, waiting_jobs: usize) -> bool {
        let key = (failure.class, failure.code.clone());
        let now = Instant::now();
        let mut raised = self.raised.lock().expect("poisoned");
        let entry = raised.entry(key).or_insert_with(|| Raised {
            since: now,
            logged: None,
            failure: failure.clone(),
        });
        entry.failure = failure.clone();
        let due = entry
            .logged
            .is_none_or(|logged| now.duration_since(logged) >= self.interval);
        if due {
            entry.logged = Some(now);
        }
        drop(raised);
        if due {
            let what = match failure.class {
                ErrorClass::Configuration => "configuration error",
                _ => "Kinesis unavailable",
            };
            tracing::error!(
                class = ?failure.class,
                code = %failure.code,
                jobs = waiting_jobs,
                error = %failure,
                "{what}: deliveries wait and are retried for as long as it lasts, never made dead (said once per {:?})",
                self.interval
            );
        }
        due
    }

    /// Records were acknowledged: the service is reachable and the credentials work again.
    /// (Problems of one stream, such as a missing stream, are left to repeat once per interval.)
    pub fn clear(&self) {
        let mut raised = self.raised.lock().expect("poisoned");
        let before = raised.len();
        raised
            .retain(|(class, code), _| *class != ErrorClass::Unavailable && code != "credentials");
        if raised.len() != before {
            drop(raised);
            tracing::info!(
                "records are acknowledged again: Kinesis answers and the credentials work"
            );
        }
    }

    /// What holds deliveries back, if anything, and for how long it has: a configuration
    /// error first, else the longest-standing problem.
    pub fn holding_back(&self) -> Option<(Failure, Duration)> {
        self.raised
            .lock()
            .expect("poisoned")
            .values()
            .max_by_key(|r| {
                (
                    r.failure.class == ErrorClass::Configuration,
                    r.since.elapsed(),
                )
            })
            .map(|r| (r.failure.clone(), r.since.elapsed()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: &str) -> Failure {
        Failure {
            class: ErrorClass::Configuration,
            code: code.into(),
            message: "m".into(),
        }
    }

    #[test]
    fn each_kind_is_said_once_per_interval_until_cleared() {
        let alarm = Alarm::new(Duration::from_secs(3600));
        assert!(alarm.raise(&failure("credentials"), 1));
        for _ in 0..100 {
            assert!(!alarm.raise(&failure("credentials"), 1));
        }
        assert!(alarm.raise(&failure("ResourceNotFoundException"), 1));
        assert!(alarm.holding_back().is_some());
        alarm.clear();
        assert!(
            alarm.raise(&failure("credentials"), 1),
            "credentials work again once records are acknowledged"
        );
        assert!(
            !alarm.raise(&failure("ResourceNotFoundException"), 1),
            "a stream's own problem repeats once per interval"
        );
    }
}
