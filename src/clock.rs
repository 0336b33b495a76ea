//! The clocks, read in one place: the monotonic clock (tokio's, so that paused test time
//! applies) and the wall clock in Unix milliseconds. Sans-IO cores never call these; their
//! callers pass the time in.

use std::time::Instant;

/// Now on the monotonic clock.
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Sleep until `deadline`; forever when there is none (a `select!` arm that never fires).
pub async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Now on the wall clock, in Unix milliseconds (0 before 1970, saturating far after).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
