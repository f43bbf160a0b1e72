//! The count hook the watchdog's signal sets: it reads the running task's
//! context and suspends, raises or removes itself. Apart from the watchdog, which
//! only knows when to set it, and from the context, which arms the watchdog.

use mlua::ffi;

use crate::lua::context::{self, HookAction, Interrupt};
use crate::lua::watchdog::slice_ended;

/// The count hook the signal sets: suspends or raises the interruption of the
/// running code (see [`context::yield_for_interrupt`]), suspends a handler whose
/// time slice ended where it can yield, or removes itself (nothing to do, or its
/// handler cannot yield here: the watchdog signals again, and a coroutine the
/// script resumed returns to the handler's own, which stays hooked).
///
/// # Safety
/// Only Lua calls it, as a count hook of `state` on the thread running `state`.
pub unsafe extern "C-unwind" fn interrupt_hook(state: *mut ffi::lua_State, _: *mut ffi::lua_Debug) {
    let message = match context::check_current() {
        HookAction::Continue => None,
        HookAction::Raise(Interrupt::Timeout) => Some(c"handler timed out"),
        HookAction::Raise(Interrupt::Cancelled) => Some(c"handler cancelled by shutdown"),
    };
    // SAFETY: called by Lua as a count hook on `state`, which may yield with no
    // values when yieldable; nothing owned lives on this frame when `lua_error`
    // unwinds it, and the hook returns right after `lua_yield`.
    unsafe {
        match message {
            None if slice_ended() && ffi::lua_isyieldable(state) != 0 && context::preempt_current(state) => {
                ffi::lua_yield(state, 0);
            }
            None => ffi::lua_sethook(state, None, 0, 0),
            Some(_) if ffi::lua_isyieldable(state) != 0 && context::yield_for_interrupt(state) => {
                ffi::lua_yield(state, 0);
            }
            Some(message) => {
                ffi::lua_pushstring(state, message.as_ptr());
                ffi::lua_error(state);
            }
        }
    }
}
