//! Counts of events a full intake could not take: requests answered 503 and
//! messages without a reply dropped, with the pace of their log line.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counts of events the intake could not take, for logs and metrics.
#[derive(Debug, Default)]
pub struct IntakeStats {
    /// Requests answered 503 because the intake was full.
    pub rejected: AtomicU64,
    /// Messages without a reply subject dropped because the intake was full.
    pub dropped: AtomicU64,
    /// When the last overload line was logged, in seconds since the process started.
    last_logged: AtomicU64,
}

/// Overload is logged at most once per this many seconds, with the counts.
const LOG_INTERVAL_SECS: u64 = 5;

impl IntakeStats {
    /// Counts a refused event; true when a log line is due.
    pub fn refused(&self, had_reply: bool) -> bool {
        let counter = if had_reply { &self.rejected } else { &self.dropped };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = process_seconds() + LOG_INTERVAL_SECS;
        let last = self.last_logged.load(Ordering::Relaxed);
        now >= last + LOG_INTERVAL_SECS
            && self.last_logged.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

fn process_seconds() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_secs()
}
