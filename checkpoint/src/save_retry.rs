//! Saves and commits outlast a store that fails (an S3 server away, a full
//! disk): tried again with backoff until `checkpoint.save_retry_seconds`,
//! by the ranks writing their shards and by the coordinator committing.

use std::time::{Duration, Instant};

use store::RetryPolicy;

use crate::CheckpointError;

/// Runs `save` until it succeeds, fails otherwise than by a failing store,
/// or `within` has passed; `retrying(error, wait)` hears of each retry.
pub fn retry_failing_store<T>(
    within: Duration,
    mut save: impl FnMut() -> Result<T, CheckpointError>,
    retrying: impl Fn(&CheckpointError, Duration),
) -> Result<T, CheckpointError> {
    let policy = RetryPolicy::until_deadline(Duration::from_millis(500), Duration::from_secs(15));
    let mut attempts = policy.start(Some(Instant::now() + within));
    loop {
        let error = match save() {
            Ok(saved) => return Ok(saved),
            Err(error) => error,
        };
        let failing_store = matches!(&error, CheckpointError::Store(store) if store.is_failure());
        match failing_store.then(|| attempts.next_delay(Instant::now())).flatten() {
            Some(wait) => {
                retrying(&error, wait);
                std::thread::sleep(wait);
            }
            None => return Err(error),
        }
    }
}
