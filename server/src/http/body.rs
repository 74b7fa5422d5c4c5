//! Reading a request body under the size limit and a minimum upload rate.
//!
//! An admitted request holds one of `MAX_QUEUE_DEPTH` slots while its body
//! arrives, so a client that trickles its upload could hold the queue with
//! a handful of connections. After a grace period, the bytes received must
//! keep ahead of `min_bytes_per_s` × the time since the first byte was
//! awaited; a client that falls behind is answered 408 and its connection
//! closed at once, well before the request deadline. Hand-written because
//! neither tower-http nor hyper has a rate floor (only whole-body timeouts,
//! which cannot tell a large upload from a slow one).

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use bytes::BytesMut;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use crate::error::Error;

/// The start of an upload exempt from the rate floor (connection set-up,
/// TCP slow start, a client that computes before it writes).
pub const UPLOAD_GRACE: Duration = Duration::from_secs(2);

/// Reads `body` whole: 413 past `limit` bytes, 408 when it arrives slower
/// than `min_bytes_per_s` after [`UPLOAD_GRACE`] (0: no floor).
pub(crate) async fn read_body(
    body: Body,
    limit: usize,
    min_bytes_per_s: u64,
) -> Result<Bytes, Error> {
    let started = Instant::now();
    let mut body = Limited::new(body, limit);
    let mut buf = BytesMut::new();
    loop {
        let next = body.frame();
        let frame = if min_bytes_per_s == 0 {
            next.await
        } else {
            // Precision loss is irrelevant for a byte count used as a time.
            #[allow(clippy::cast_precision_loss)]
            let earned = Duration::from_secs_f64(buf.len() as f64 / min_bytes_per_s as f64);
            let due = started + UPLOAD_GRACE + earned;
            tokio::time::timeout_at(due.into(), next)
                .await
                .map_err(|_| Error::SlowUpload { min_bytes_per_s })?
        };
        match frame {
            None => return Ok(buf.freeze()),
            Some(Err(e)) if e.is::<LengthLimitError>() => {
                return Err(Error::PayloadTooLarge { limit });
            }
            Some(Err(e)) => {
                return Err(Error::BadRequest(format!("reading the request body: {e}")));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::StreamExt as _;

    use super::*;

    /// A body sending `chunk` bytes every `every`, `n` times.
    fn trickle(chunk: usize, every: Duration, n: usize) -> Body {
        let stream = futures::stream::iter(0..n).then(move |_| async move {
            tokio::time::sleep(every).await;
            Ok::<_, Infallible>(Bytes::from(vec![7u8; chunk]))
        });
        Body::from_stream(stream)
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_upload_is_read_whole() {
        let body = trickle(64 * 1024, Duration::from_millis(100), 20);
        let bytes = read_body(body, 4 << 20, 64 * 1024).await.unwrap();
        assert_eq!(bytes.len(), 20 * 64 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_is_cut_soon_after_the_grace() {
        let started = tokio::time::Instant::now();
        let body = trickle(100, Duration::from_millis(500), 1000);
        let err = read_body(body, 4 << 20, 64 * 1024).await.unwrap_err();
        assert_eq!(err.reason(), "slow_upload");
        assert!(
            started.elapsed() < UPLOAD_GRACE + Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_floor_waits_as_long_as_it_takes() {
        let body = trickle(100, Duration::from_secs(1), 10);
        assert_eq!(read_body(body, 4 << 20, 0).await.unwrap().len(), 1000);
    }

    #[tokio::test]
    async fn the_size_limit_still_holds() {
        let err = read_body(Body::from(vec![0u8; 2048]), 1024, 1)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "payload_too_large");
    }
}
