//! Panics as log records, and confining one to the work it interrupts.
//!
//! A panic is a bug, but one event's must not take its VM down or leave its
//! requester waiting. [`catch`] confines a panic to the future it wraps; the hook
//! [`install_hook`] sets writes every other panic as one ERROR record in the
//! worker's log format instead of plain text on stderr.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::panic::{self, AssertUnwindSafe};
use std::pin::pin;
use std::sync::Once;

/// What a panic said and where.
#[derive(Debug)]
pub struct PanicReport {
    pub message: String,
    pub location: String,
}

thread_local! {
    /// Set while [`catch`] polls on this thread: its caller logs the panic.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// Where the last caught panic happened, left by the hook for [`catch`].
    static CAUGHT_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Logs panics as ERROR records (with a backtrace when `RUST_BACKTRACE` asks for
/// one); a panic inside [`catch`] is left to its caller. Installed once.
pub fn install_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        panic::set_hook(Box::new(|info| {
            let location = info.location().map(|l| l.to_string()).unwrap_or_default();
            if CATCHING.get() {
                CAUGHT_AT.set(Some(location));
                return;
            }
            let message = message_of(info.payload());
            let backtrace = std::backtrace::Backtrace::capture();
            if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
                tracing::error!(panic = %message, location = %location, backtrace = %backtrace, "panic");
            } else {
                tracing::error!(panic = %message, location = %location, "panic");
            }
        }));
    });
}

/// Runs `future`, turning a panic in any of its polls into an error.
pub async fn catch<F: Future>(future: F) -> Result<F::Output, PanicReport> {
    let mut future = pin!(future);
    poll_fn(|cx| {
        let outer = CATCHING.replace(true);
        let polled = panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx)));
        CATCHING.set(outer);
        match polled {
            Ok(poll) => poll.map(Ok),
            Err(payload) => {
                let location = CAUGHT_AT.take().unwrap_or_default();
                std::task::Poll::Ready(Err(PanicReport { message: message_of(payload.as_ref()), location }))
            }
        }
    })
    .await
}

fn message_of(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_later_poll_is_caught_with_its_message_and_place() {
        install_hook();
        let caught = catch(async {
            tokio::task::yield_now().await;
            if true {
                panic!("bad header {}", 7);
            }
        })
        .await
        .unwrap_err();
        assert_eq!(caught.message, "bad header 7");
        assert!(caught.location.contains("panics.rs"), "{}", caught.location);
        assert_eq!(catch(async { 5 }).await.unwrap(), 5);
        assert!(!CATCHING.get(), "the flag is cleared after each poll");
    }
}
