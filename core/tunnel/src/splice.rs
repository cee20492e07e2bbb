//! Bidirectional byte splice between two streams, ended by either side or by
//! the drain deadline after shutdown.

use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional_with_sizes};

use crate::Shutdown;

/// Copies both ways until both directions finish, an error, or the drain
/// deadline. Returns bytes copied (a->b, b->a) when it ended normally.
pub async fn splice<A, B>(a: &mut A, b: &mut B, shutdown: &Shutdown) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // Allocated per direction for the splice's whole life (exec, attach,
    // port-forward), idle or not: 32 KiB keeps 128 streams at 8 MiB per role
    // (ADR 0015) and still fills a WebSocket message in two reads.
    const BUF: usize = 32 << 10;
    tokio::select! {
        r = copy_bidirectional_with_sizes(a, b, BUF, BUF) => r,
        _ = shutdown.drained() => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "drain deadline reached during shutdown",
        )),
    }
}
