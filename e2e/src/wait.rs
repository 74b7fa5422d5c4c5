//! Polling until a condition holds, with a deadline and the last observation
//! in the error.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How often [`until`] polls.
pub const POLL: Duration = Duration::from_millis(200);

/// Calls `probe` every [`POLL`] until it returns `Ok(Some(value))`.
///
/// `Ok(None)` means "not yet"; `Err(e)` is also treated as "not yet" (the
/// API may be briefly unavailable) but is remembered, and the last one is
/// reported when `timeout` passes.
pub async fn until<T, E, F, Fut>(what: impl Display, timeout: Duration, mut probe: F) -> Result<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<Option<T>, E>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: what.to_string(),
                waited: timeout,
                detail: if last.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {last})")
                },
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
