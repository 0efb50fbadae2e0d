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
    retrying: impl Fn(&store::StoreError, Duration),
) -> Result<T, CheckpointError> {
    let policy = RetryPolicy::until_deadline(Duration::from_millis(500), Duration::from_secs(15));
    let mut attempts = policy.start(Some(Instant::now() + within));
    loop {
        let failing = match save() {
            Ok(saved) => return Ok(saved),
            Err(CheckpointError::Store(store)) if store.is_failure() => store,
            Err(error) => return Err(error),
        };
        let Some(wait) = attempts.next_delay(Instant::now()) else {
            return Err(CheckpointError::StoreGaveUp {
                seconds: within.as_secs(),
                source: failing,
            });
        };
        retrying(&failing, wait);
        std::thread::sleep(wait);
    }
}
