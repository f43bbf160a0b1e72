//! Rate limits for repeated log records: a flood of identical failures (200k bad
//! requests) becomes one line per key and interval, carrying how many were left
//! out, instead of 200k lines in the log pipeline.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys beyond this many are forgotten at once: kinds come from subjects, so
/// their number is not bounded by the script.
const MAX_KEYS: usize = 10_000;

pub struct LogLimit<K> {
    interval: Duration,
    seen: Mutex<Option<HashMap<K, Window>>>,
}

struct Window {
    started: Instant,
    suppressed: u64,
}

impl<K: Hash + Eq> LogLimit<K> {
    pub const fn new(interval: Duration) -> Self {
        LogLimit { interval, seen: Mutex::new(None) }
    }

    /// `Some(left out since the last record)` when a record for `key` is due,
    /// `None` when this one is to be left out (and counted).
    pub fn admit(&self, key: K) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let seen = seen.get_or_insert_with(HashMap::new);
        if seen.len() >= MAX_KEYS && !seen.contains_key(&key) {
            seen.clear();
        }
        let now = Instant::now();
        match seen.get_mut(&key) {
            Some(window) if now.duration_since(window.started) < self.interval => {
                window.suppressed += 1;
                None
            }
            Some(window) => {
                let suppressed = std::mem::take(&mut window.suppressed);
                window.started = now;
                Some(suppressed)
            }
            None => {
                seen.insert(key, Window { started: now, suppressed: 0 });
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_key_and_interval_with_the_count_left_out() {
        let limit = LogLimit::new(Duration::from_millis(50));
        assert_eq!(limit.admit(("a", 500)), Some(0));
        assert_eq!(limit.admit(("a", 500)), None);
        assert_eq!(limit.admit(("a", 500)), None);
        assert_eq!(limit.admit(("a", 404)), Some(0), "another code is another key");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.admit(("a", 500)), Some(2));
    }
}
