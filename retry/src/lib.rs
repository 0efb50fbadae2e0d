//! One retry helper for every transient failure coca meets: an object store
//! call, the worker's first connection to the coordinator, a rank dialing
//! its ring neighbour. Exponential backoff between attempts, bounded by a
//! number of attempts, a deadline, or both.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// The object store's: five attempts over about 1.5 s.
    fn default() -> Self {
        Self {
            attempts: 5,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Retries until a deadline decides, doubling the wait from `first_delay` up to `max_delay`.
    pub fn until_deadline(first_delay: Duration, max_delay: Duration) -> Self {
        Self {
            attempts: u32::MAX,
            first_delay,
            max_delay,
        }
    }

    /// The wait before attempt `attempt` (1-based; attempt 1 does not wait).
    pub fn delay(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let factor = 1u32 << (attempt - 2).min(16);
        (self.first_delay * factor).min(self.max_delay)
    }

    /// The attempts of one operation, optionally bounded by `deadline`.
    pub fn start(&self, deadline: Option<Instant>) -> Attempts {
        Attempts {
            policy: *self,
            deadline,
            made: 1,
        }
    }
}

/// The attempts of one operation under a policy.
#[derive(Debug, Clone)]
pub struct Attempts {
    policy: RetryPolicy,
    deadline: Option<Instant>,
    made: u32,
}

impl Attempts {
    /// Attempts made so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// After a failed attempt: the wait before the next one, or `None`
    /// when the attempts are spent or the wait would pass the deadline.
    pub fn next_delay(&mut self, now: Instant) -> Option<Duration> {
        if self.made >= self.policy.attempts {
            return None;
        }
        let delay = self.policy.delay(self.made + 1);
        if self.deadline.is_some_and(|deadline| now + delay > deadline) {
            return None;
        }
        self.made += 1;
        Some(delay)
    }
}

/// Why retrying stopped: the last error and the attempts made.
#[derive(Debug)]
pub struct GaveUp<E> {
    pub error: E,
    pub attempts: u32,
}

/// Runs `attempt` until it succeeds, fails with an error `transient`
/// rejects, or the policy gives up; blocks the thread between attempts.
pub fn retry_blocking<T, E>(
    policy: &RetryPolicy,
    deadline: Option<Instant>,
    transient: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, GaveUp<E>> {
    let mut attempts = policy.start(deadline);
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(error) => match transient(&error).then(|| attempts.next_delay(Instant::now())).flatten() {
                Some(delay) => std::thread::sleep(delay),
                None => {
                    return Err(GaveUp {
                        error,
                        attempts: attempts.made(),
                    })
                }
            },
        }
    }
}

/// [`retry_blocking`] for async operations, waiting on the tokio timer.
pub async fn retry<T, E, Fut>(
    policy: &RetryPolicy,
    deadline: Option<Instant>,
    transient: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, GaveUp<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts = policy.start(deadline);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => match transient(&error).then(|| attempts.next_delay(Instant::now())).flatten() {
                Some(delay) => tokio::time::sleep(delay).await,
                None => {
                    return Err(GaveUp {
                        error,
                        attempts: attempts.made(),
                    })
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_stops_retrying_before_a_wait_would_pass_it() {
        let policy = RetryPolicy::until_deadline(Duration::from_millis(10), Duration::from_millis(40));
        let start = Instant::now();
        let mut attempts = policy.start(Some(start + Duration::from_millis(100)));
        let mut waited = Duration::ZERO;
        while let Some(delay) = attempts.next_delay(start + waited) {
            waited += delay;
        }
        // 10 + 20 + 40 = 70 ms; another 40 would end past 100.
        assert_eq!(waited, Duration::from_millis(70));
        assert_eq!(attempts.made(), 4);
    }

    #[test]
    fn an_error_that_is_not_transient_is_not_retried() {
        let policy = RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        };
        let mut calls = 0;
        let gave_up = retry_blocking(
            &policy,
            None,
            |error: &&str| *error == "reset",
            || {
                calls += 1;
                Err::<(), _>(if calls < 3 { "reset" } else { "denied" })
            },
        )
        .unwrap_err();
        assert_eq!((gave_up.error, gave_up.attempts, calls), ("denied", 3, 3));
    }
}
