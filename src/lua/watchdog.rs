//! Interrupts Lua code that runs past its deadline, at no cost while it does not.
//!
//! An instruction-count hook makes Lua 5.4 route every instruction through its hook
//! check, which halves the speed of CPU-bound handlers. So Lua runs without a hook,
//! and one watchdog thread per process watches every VM's armed deadline. When one
//! passes (or shutdown cancels the code), the watchdog sends the VM's thread a
//! signal; the signal handler, on that thread, sets a count hook on the Lua states
//! running there (`lua_sethook` is async-signal-safe for exactly this, as the
//! reference interpreter uses it for Ctrl-C), and the hook raises the interruption.
//! Setting the hook from the watchdog thread itself would race with the VM walking
//! and freeing its call frames; a signal runs on the VM's own thread instead.
//!
//! The signal handler can only reach states it knows: the VM's main state, the
//! handler coroutine being polled and the coroutines a script resumed inside it
//! ([`enter`]/[`leave`] keep that list, see [`crate::lua_api::interrupt`]).
//!
//! The same signal ends a handler's time slice: while the VM's scheduler polls a
//! handler ([`begin_turn`]), the watchdog asks the VM to suspend it once it ran
//! for a slice, and the hook yields it where Lua can yield (see
//! [`crate::worker::scheduler`]). Between slices no hook is set, so CPU-bound code
//! runs at plain Lua speed.
//!
//! Code that no hook can stop (a C function that never returns, such as a
//! backtracking pattern match) is the last case: a VM that runs one piece of Lua
//! code longer than its deadline plus [`STUCK_MARGIN`] is logged as an error,
//! counted, and fails the liveness probe ([`stuck_vms`]) so the pod is restarted.

use std::cell::OnceCell;
use std::ffi::c_int;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use mlua::ffi;
use tokio_util::sync::CancellationToken;

/// How long past its deadline a piece of Lua code may run before its VM counts as
/// stuck: interrupted code unwinds in far less, even on a loaded machine.
pub const STUCK_MARGIN: Duration = Duration::from_secs(5);
/// How often overdue code is signalled again, and the longest an armed deadline
/// waits for a check (shutdown cancellation is noticed within this).
const BUSY_TICK: Duration = Duration::from_millis(20);
/// The watchdog's sleep while no VM runs Lua code.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// The signal that asks a VM thread to hook its Lua states. Ignored by default, so
/// a stray one harms nothing; the Go runtime uses it for preemption the same way.
const SIGNAL: c_int = libc::SIGURG;
/// Coroutines nested deeper than this are not tracked; Lua's own C-stack limit
/// (200 nested calls) stops scripts well before.
const MAX_ACTIVE: usize = 256;
/// How often a VM whose slice ended is signalled again while its code cannot
/// yield (inside a C function such as `table.sort`). A hook that stays set
/// would slow every instruction, so the hook removes itself and the watchdog
/// asks again.
const SLICE_RETRY: Duration = Duration::from_millis(1);
/// [`Watchdog::wakes_at`] while the watchdog scans: whoever starts a turn then
/// wakes it again.
const SCANNING: u64 = 0;

/// One VM as the watchdog sees it. Written by the VM thread when it enters and
/// leaves Lua code, read by the watchdog.
pub struct Watch {
    thread: libc::pthread_t,
    cancel: CancellationToken,
    /// Nanoseconds after [`epoch`] at which the running code is overdue; 0 = none runs.
    deadline: AtomicU64,
    /// The running code stops when `cancel` fires (handlers; not init or cleanup).
    cancellable: AtomicBool,
    /// Changes with every piece of code armed, so a report names one run once.
    generation: AtomicU64,
    /// The event kind of the running code, for the stuck report.
    kind: Mutex<Option<String>>,
    stuck: AtomicBool,
    /// The time slice in nanoseconds; 0 = off.
    slice: AtomicU64,
    /// Nanoseconds after [`epoch`] at which the handler being polled started its
    /// turn; 0 = none is.
    running_since: AtomicU64,
    /// The start of the last turn, so the watchdog sees that turns happen.
    last_turn: AtomicU64,
    /// The turn (its start) the watchdog asked to end.
    preempt: AtomicU64,
    /// The last turn the watchdog saw, for its own pace; watchdog thread only.
    seen_turn: AtomicU64,
}

/// What [`arm`] replaced, restored by [`disarm`] (armed code may nest).
pub struct Armed {
    deadline: u64,
    cancellable: bool,
}

struct Watchdog {
    watches: Mutex<Vec<Weak<Watch>>>,
    thread: Thread,
    /// Nanoseconds after [`epoch`] when the watchdog wakes next.
    wakes_at: AtomicU64,
    stuck: AtomicUsize,
    stuck_total: AtomicU64,
}

static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();
static EPOCH: OnceLock<Instant> = OnceLock::new();

thread_local! {
    static WATCH: OnceCell<Arc<Watch>> = const { OnceCell::new() };
    static ACTIVE: Active = const { Active::new() };
}

/// The Lua states of this thread that may be running: read by the signal handler,
/// so plain atomics only, no locks or allocation.
struct Active {
    main: AtomicPtr<ffi::lua_State>,
    states: [AtomicPtr<ffi::lua_State>; MAX_ACTIVE],
    len: AtomicUsize,
}

impl Active {
    const fn new() -> Self {
        Active {
            main: AtomicPtr::new(ptr::null_mut()),
            states: [const { AtomicPtr::new(ptr::null_mut()) }; MAX_ACTIVE],
            len: AtomicUsize::new(0),
        }
    }
}

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

fn nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// Registers the calling thread as the VM running `lua`; from now on [`arm`] on this
/// thread is watched, and handler turns longer than `time_slice` end (`None` =
/// never). Call once per VM thread, on that thread.
pub fn register(
    lua: &mlua::Lua,
    cancel: CancellationToken,
    time_slice: Option<Duration>,
    hook: ffi::lua_Hook,
) -> std::io::Result<()> {
    let _ = HOOK.set(hook);
    let watchdog = watchdog()?;
    let mut main = ptr::null_mut();
    // SAFETY: reads the main thread from the registry, leaving the stack as it was;
    // the one push fits the `LUA_MINSTACK` slots of the protected call's frame.
    let found = unsafe {
        lua.exec_raw::<()>((), |state| {
            ffi::lua_rawgeti(state, ffi::LUA_REGISTRYINDEX, ffi::LUA_RIDX_MAINTHREAD);
            main = ffi::lua_tothread(state, -1);
            ffi::lua_pop(state, 1);
        })
    };
    found.map_err(|err| std::io::Error::other(format!("cannot find the main Lua state: {err}")))?;
    // SAFETY: pthread_self has no preconditions.
    let thread = unsafe { libc::pthread_self() };
    let watch = Arc::new(Watch {
        thread,
        cancel,
        deadline: AtomicU64::new(0),
        cancellable: AtomicBool::new(false),
        generation: AtomicU64::new(0),
        kind: Mutex::new(None),
        stuck: AtomicBool::new(false),
        slice: AtomicU64::new(time_slice.map_or(0, |slice| u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX))),
        running_since: AtomicU64::new(0),
        last_turn: AtomicU64::new(0),
        preempt: AtomicU64::new(0),
        seen_turn: AtomicU64::new(0),
    });
    ACTIVE.with(|active| active.main.store(main, SeqCst));
    let _ = WATCH.with(|cell| cell.set(watch.clone()));
    watchdog.watches.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(Arc::downgrade(&watch));
    Ok(())
}

/// Marks the start of Lua code on this thread that must stop at `deadline` (and at
/// shutdown when `cancellable`). Cheap: a few atomic stores.
pub fn arm(deadline: Option<Instant>, cancellable: bool, kind: Option<&str>) -> Option<Armed> {
    WATCH.with(|cell| {
        let watch = cell.get()?;
        let new = deadline.map_or(u64::MAX, nanos);
        let previous = Armed {
            deadline: watch.deadline.swap(new, SeqCst),
            cancellable: watch.cancellable.swap(cancellable, SeqCst),
        };
        watch.generation.fetch_add(1, SeqCst);
        if let Some(kind) = kind {
            let mut slot = watch.kind.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if slot.as_deref() != Some(kind) {
                *slot = Some(kind.to_string());
            }
        }
        if let Some(watchdog) = WATCHDOG.get()
            && new < watchdog.wakes_at.load(SeqCst)
        {
            watchdog.thread.unpark();
        }
        Some(previous)
    })
}

/// Marks the end of the code [`arm`] started.
pub fn disarm(armed: Option<Armed>) {
    let Some(armed) = armed else { return };
    WATCH.with(|cell| {
        if let Some(watch) = cell.get() {
            watch.deadline.store(armed.deadline, SeqCst);
            watch.cancellable.store(armed.cancellable, SeqCst);
        }
    });
}

/// Marks the start, at `now`, of a handler's turn on this VM: once it ran for a
/// time slice, the watchdog asks the VM to suspend it (see the module docs).
/// Returns whether the turn is watched, for [`end_turn`].
pub fn begin_turn(now: Instant) -> bool {
    WATCH.with(|cell| {
        let Some(watch) = cell.get() else { return false };
        let slice = watch.slice.load(SeqCst);
        if slice == 0 {
            return false;
        }
        let since = nanos(now);
        watch.running_since.store(since, SeqCst);
        watch.last_turn.store(since, SeqCst);
        if let Some(watchdog) = WATCHDOG.get() {
            let wakes_at = watchdog.wakes_at.load(SeqCst);
            if wakes_at == SCANNING || since.saturating_add(slice) < wakes_at {
                watchdog.thread.unpark();
            }
        }
        true
    })
}

/// Marks the end of the turn [`begin_turn`] started.
pub fn end_turn(watched: bool) {
    if watched {
        WATCH.with(|cell| {
            if let Some(watch) = cell.get() {
                watch.running_since.store(0, SeqCst);
            }
        });
    }
}

/// Whether the watchdog asked to end the turn running now.
pub fn slice_ended() -> bool {
    WATCH.with(|cell| {
        cell.get().is_some_and(|watch| {
            let preempt = watch.preempt.load(SeqCst);
            preempt != 0 && preempt == watch.running_since.load(SeqCst)
        })
    })
}

/// Records that Lua state `state` runs (or may run) from now on this thread, until
/// [`leave`] with the returned mark.
pub fn enter(state: *mut ffi::lua_State) -> usize {
    ACTIVE.with(|active| {
        let len = active.len.load(SeqCst);
        if !state.is_null() && len < MAX_ACTIVE {
            active.states[len].store(state, SeqCst);
            active.len.store(len + 1, SeqCst);
        }
        len
    })
}

/// Forgets the states entered since `mark` was taken.
pub fn leave(mark: usize) {
    ACTIVE.with(|active| {
        if active.len.load(SeqCst) > mark {
            active.len.store(mark, SeqCst);
        }
    });
}

/// VMs stuck right now (see the module docs); the liveness probe fails while any is.
pub fn stuck_vms() -> usize {
    WATCHDOG.get().map_or(0, |w| w.stuck.load(SeqCst))
}

/// VMs found stuck since the process started.
pub fn stuck_total() -> u64 {
    WATCHDOG.get().map_or(0, |w| w.stuck_total.load(SeqCst))
}

fn watchdog() -> std::io::Result<&'static Watchdog> {
    static START: Mutex<()> = Mutex::new(());
    if let Some(watchdog) = WATCHDOG.get() {
        return Ok(watchdog);
    }
    let _starting = START.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(watchdog) = WATCHDOG.get() {
        return Ok(watchdog);
    }
    install_signal_handler()?;
    let handle = std::thread::Builder::new().name("lua-watchdog".to_string()).spawn(|| {
        loop {
            if let Some(watchdog) = WATCHDOG.get() {
                watchdog.run()
            }
            std::thread::park();
        }
    })?;
    let watchdog = WATCHDOG.get_or_init(|| Watchdog {
        watches: Mutex::new(Vec::new()),
        thread: handle.thread().clone(),
        wakes_at: AtomicU64::new(0),
        stuck: AtomicUsize::new(0),
        stuck_total: AtomicU64::new(0),
    });
    watchdog.thread.unpark();
    Ok(watchdog)
}

impl Watchdog {
    fn run(&self) -> ! {
        loop {
            self.wakes_at.store(SCANNING, SeqCst);
            let now = Instant::now();
            let mut wake = now + IDLE_TICK;
            let mut stuck = 0;
            let mut newly_stuck = Vec::new();
            let watches: Vec<Arc<Watch>> = {
                let mut list = self.watches.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                list.retain(|w| w.strong_count() > 0);
                list.iter().filter_map(Weak::upgrade).collect()
            };
            for watch in &watches {
                wake = wake.min(watch.check_slice(now));
                let generation = watch.generation.load(SeqCst);
                let deadline = watch.deadline.load(SeqCst);
                if deadline == 0 {
                    watch.stuck.store(false, SeqCst);
                    continue;
                }
                let due = if deadline == u64::MAX { None } else { Some(epoch() + Duration::from_nanos(deadline)) };
                let cancelled = watch.cancellable.load(SeqCst) && watch.cancel.is_cancelled();
                let overdue_since = match due {
                    Some(due) if now >= due => Some(due),
                    _ if cancelled => Some(now),
                    _ => None,
                };
                let Some(since) = overdue_since else {
                    watch.stuck.store(false, SeqCst);
                    wake = wake.min(now + BUSY_TICK);
                    if let Some(due) = due {
                        wake = wake.min(due);
                    }
                    continue;
                };
                // SAFETY: a VM thread is armed only while it runs Lua code, so it
                // is alive; its `Watch` dies with it.
                unsafe { libc::pthread_kill(watch.thread, SIGNAL) };
                wake = wake.min(now + BUSY_TICK);
                let still_running = watch.generation.load(SeqCst) == generation;
                if still_running && now >= since + STUCK_MARGIN {
                    stuck += 1;
                    if !watch.stuck.swap(true, SeqCst) {
                        newly_stuck.push((watch, now - since));
                    }
                }
            }
            // The probe fails before the log says so: whoever reads the log finds it failing.
            self.stuck.store(stuck, SeqCst);
            for (watch, overdue) in newly_stuck {
                self.report(watch, overdue);
            }
            self.wakes_at.store(nanos(wake), SeqCst);
            std::thread::park_timeout(wake.saturating_duration_since(Instant::now()));
        }
    }

    fn report(&self, watch: &Watch, overdue: Duration) {
        let total = self.stuck_total.fetch_add(1, SeqCst) + 1;
        let kind = watch.kind.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        tracing::error!(
            kind = kind.as_deref().unwrap_or("(init or cleanup)"),
            overdue = %humantime::format_duration(Duration::from_millis(overdue.as_millis() as u64)),
            stuck_total = total,
            "a Lua VM is stuck: one piece of Lua code ran past its deadline and cannot be interrupted \
             (most likely inside a C function such as a backtracking string pattern); /healthz fails \
             until it returns, so the orchestrator restarts the worker"
        );
    }
}

impl Watch {
    /// Asks the VM to end a turn that ran for its slice; returns when to look
    /// again. While turns happen, the watchdog wakes every slice, so starting a
    /// turn seldom has to wake it.
    fn check_slice(&self, now: Instant) -> Instant {
        let slice = self.slice.load(SeqCst);
        if slice == 0 {
            return now + IDLE_TICK;
        }
        let last_turn = self.last_turn.load(SeqCst);
        let active = self.seen_turn.swap(last_turn, SeqCst) != last_turn;
        let idle_wake = if active { now + Duration::from_nanos(slice) } else { now + IDLE_TICK };
        let since = self.running_since.load(SeqCst);
        if since == 0 {
            return idle_wake;
        }
        let due = since.saturating_add(slice);
        if nanos(now) < due {
            return idle_wake.min(epoch() + Duration::from_nanos(due));
        }
        self.preempt.store(since, SeqCst);
        // SAFETY: a VM thread polls handlers only while alive; its `Watch` dies with it.
        unsafe { libc::pthread_kill(self.thread, SIGNAL) };
        now + SLICE_RETRY
    }
}

/// The count hook the signal sets on a VM's Lua states: it decides, from the
/// running task's context, what the interrupted code does (see
/// [`crate::lua::hook`]). The same for every VM; set by the first [`register`].
static HOOK: OnceLock<ffi::lua_Hook> = OnceLock::new();

fn install_signal_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask is valid;
    // the handler only does async-signal-safe work (see `on_signal`).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(SIGNAL, &action, ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs on a VM thread when the watchdog signals it: hooks every Lua state that may
/// be running there. Only atomics and `lua_sethook`, both async-signal-safe.
extern "C" fn on_signal(_: c_int) {
    let Some(&hook) = HOOK.get() else { return };
    let _ = ACTIVE.try_with(|active| {
        let len = active.len.load(SeqCst).min(MAX_ACTIVE);
        let main = active.main.load(SeqCst);
        let states = active.states[..len].iter().map(|s| s.load(SeqCst));
        for state in std::iter::once(main).chain(states).filter(|s| !s.is_null()) {
            // SAFETY: the states listed are alive while listed (the VM removes a
            // state before it can be collected), and this runs on their thread.
            unsafe { ffi::lua_sethook(state, Some(hook), ffi::LUA_MASKCOUNT, 1) };
        }
    });
}
