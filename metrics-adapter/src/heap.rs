//! Gives freed heap memory back to the OS (ADR 0015).
//!
//! glibc keeps freed memory in its arenas: after a burst of streams the edge
//! held 5x its idle RSS for good, though the data was long gone. Once per
//! period, when the heap holds more than [`TRIM_ABOVE`] free bytes, the heap
//! trimmer asks glibc to return it. Quiet processes pay one `mallinfo2` call
//! per period; nothing is trimmed under steady load that reuses its memory.

use std::sync::Once;
use std::time::Duration;

/// How often the trimmer looks: well inside the 30 s in which RSS must settle.
const PERIOD: Duration = Duration::from_secs(5);
/// Free heap bytes worth a trim.
const TRIM_ABOVE: usize = 4 << 20;

static STARTED: Once = Once::new();

/// Starts the process's heap trimmer on the current tokio runtime, once per
/// process (a demo runs cloud and edge in one). It lives as long as the
/// runtime. On non-glibc targets it does nothing: their allocators return
/// memory by themselves or not at all.
pub fn spawn_heap_trimmer() {
    STARTED.call_once(|| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Trimming walks every arena under its lock: keep it off the
                // async workers.
                let _ = tokio::task::spawn_blocking(trim_if_worth_it).await;
            }
        });
    });
}

/// Returns freed heap memory to the OS when enough of it is free; true when
/// glibc gave some back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // The one exception in the workspace (ADR 0015).
pub fn trim_if_worth_it() -> bool {
    // SAFETY: both are thread-safe glibc calls without preconditions.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    if free < TRIM_ABOVE {
        return false;
    }
    let released = unsafe { libc::malloc_trim(0) } == 1;
    tracing::debug!(free, released, "heap trim");
    released
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_if_worth_it() -> bool {
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Memory freed behind a live allocation (so glibc's own top-of-heap
    /// trim can't return it) is given back by the trimmer.
    #[test]
    fn freed_fragmented_heap_is_returned() {
        std::thread::spawn(|| {
            let chunks: Vec<Vec<u8>> = (0..512).map(|i| vec![i as u8; 64 << 10]).collect();
            let pin = vec![1u8; 1024];
            drop(chunks);
            assert!(super::trim_if_worth_it(), "32 MiB freed, nothing returned");
            drop(pin);
        })
        .join()
        .unwrap();
    }
}
