//! Backpressure made visible. A response body is polled for its next frame
//! only when the consumer can take it: hyper stops polling while the h2
//! stream's send window is empty (edge) or the client's socket is full
//! (cloud front). A long gap between handing out a frame and being asked for
//! the next one is therefore a flow-control stall, charged to this stream
//! alone.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::{Body, BoxError};

/// Gaps shorter than this are ordinary scheduling, not a stall.
pub const STALL_THRESHOLD: Duration = Duration::from_millis(50);

/// Called with the length of each stall.
pub type StallHook = Arc<dyn Fn(Duration) + Send + Sync>;

/// Wraps `inner`, reporting each stall to `hook`.
pub fn stall_metered(inner: Body, hook: StallHook) -> Body {
    StallBody {
        inner,
        handed_out: None,
        hook,
    }
    .boxed_unsync_body()
}

struct StallBody {
    inner: Body,
    handed_out: Option<Instant>,
    hook: StallHook,
}

impl StallBody {
    fn boxed_unsync_body(self) -> Body {
        http_body_util::BodyExt::boxed_unsync(self)
    }
}

impl HttpBody for StallBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(at) = self.handed_out.take() {
            let waited = at.elapsed();
            if waited >= STALL_THRESHOLD {
                (self.hook)(waited);
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(&polled, Poll::Ready(Some(Ok(f))) if f.is_data()) {
            self.handed_out = Some(Instant::now());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::Mutex;

    #[tokio::test]
    async fn a_slow_consumer_is_reported_and_a_fast_one_is_not() {
        let stalls = Arc::new(Mutex::new(Vec::new()));
        let seen = stalls.clone();
        let frames = (0..3).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))));
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let mut body = stall_metered(
            inner.boxed_unsync(),
            Arc::new(move |d| seen.lock().unwrap().push(d)),
        );
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        assert!(stalls.lock().unwrap().is_empty());
        tokio::time::sleep(STALL_THRESHOLD * 2).await;
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        let stalls = stalls.lock().unwrap();
        assert_eq!(stalls.len(), 1);
        assert!(stalls[0] >= STALL_THRESHOLD * 2);
    }
}
