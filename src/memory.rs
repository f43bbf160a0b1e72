//! Giving memory back after a burst.
//!
//! Large payloads raise a worker's resident memory while they are handled: Lua
//! collects garbage only while it allocates, and the allocator keeps each
//! thread's freed pages for reuse, so a worker that goes quiet after a burst
//! would keep that memory. Every few seconds each VM compares the process's
//! resident memory with its level after the last release; once it grew by more
//! than a threshold and the VM has no handler running (the burst is over), the
//! VM runs a full Lua collection and returns its thread's free pages to the
//! system. The process's own runtime thread does the same for its pages. A
//! steady load never pays for it: it runs only when a VM is idle.

use std::time::Duration;

use mlua::WeakLua;

/// How often memory is looked at.
const INTERVAL: Duration = Duration::from_secs(2);
/// Growth since the last release that makes an idle moment release.
const GROWTH: u64 = 8 << 20;

/// Runs on a VM's thread until the VM is gone; `idle` says whether the VM has no
/// handler running.
pub async fn release_after_bursts(lua: WeakLua, idle: impl Fn() -> bool) {
    let mut floor = resident_bytes();
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let now = resident_bytes();
        floor = floor.min(now);
        if now <= floor + GROWTH || !idle() {
            continue;
        }
        let Some(lua) = lua.try_upgrade() else { return };
        if let Err(err) = lua.gc_collect() {
            tracing::debug!(error = %err, "full Lua collection failed");
        }
        drop(lua);
        return_free_pages();
        floor = resident_bytes();
    }
}

/// Runs on the process's runtime until `stop`: returns that thread's free pages
/// after its memory grew (messages read there, replies written there).
pub async fn release_runtime_pages(stop: tokio_util::sync::CancellationToken) {
    let mut floor = resident_bytes();
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = resident_bytes();
        floor = floor.min(now);
        if now > floor + GROWTH {
            return_free_pages();
            floor = resident_bytes();
        }
    }
}

/// The process's resident memory, from `/proc/self/statm`; 0 where it cannot
/// be read, which turns releasing off.
fn resident_bytes() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else { return 0 };
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page_size).unwrap_or(4096)
}

/// Returns the calling thread's free allocator pages to the system.
pub fn return_free_pages() {
    // SAFETY: mi_collect has no preconditions; `force` also frees the pages
    // other threads returned to this one.
    unsafe { libmimalloc_sys::mi_collect(true) };
}
