//! Building Lua values directly on the Lua stack, for the per-event work where
//! mlua's per-value handles cost more than the work itself.
//!
//! The stack rule, for every raw block in this crate: Lua guarantees only
//! `LUA_MINSTACK` (20) free slots to a C function, and a push past the reserved
//! space writes past the end of the stack without any check. So every block
//! reserves, before its first push, every slot it may use (`lua_checkstack`, or
//! `luaL_checkstack` where raising is safe), counting nested levels of a
//! recursive builder; `build_value` and `read_value` do it for the slots their
//! callers declare.
//!
//! Without `--lua-memory-limit` the stack work runs unprotected, as mlua's own
//! internals do: an allocation failure there means the process is out of memory,
//! which aborts it either way. With a limit, it runs inside a protected call, so
//! an allocation over the limit becomes an ordinary error of the handler; the
//! builders hold only references and plain numbers, so nothing is leaked when
//! such an error unwinds out of them.

use std::ffi::c_int;

use mlua::{Lua, MultiValue, Value, ffi};

/// Marks a VM whose allocations are capped, so stack work must be protected.
pub struct MemoryLimited;

/// Pushes `args` (at stack indexes `base + 1 ..`), runs `build`, which must push
/// exactly one value and may use `slots` more stack slots, and returns that value.
///
/// # Safety
/// `build` must keep to that stack discipline, and must not hold values with
/// destructors (it may be unwound by a Lua error when protected).
pub unsafe fn build_value(
    lua: &Lua,
    args: &[&Value],
    slots: usize,
    build: impl FnOnce(*mut ffi::lua_State, c_int),
) -> mlua::Result<Value> {
    if lua.app_data_ref::<MemoryLimited>().is_some() {
        // SAFETY: `build` pushes one value above the arguments; it replaces them.
        // The protected call starts a fresh C frame with `LUA_MINSTACK` slots, so
        // the declared ones are reserved inside it; failing raises a Lua error,
        // which the protected call turns into an ordinary one.
        let protected = |state: *mut ffi::lua_State| unsafe {
            ffi::luaL_checkstack(state, reserved(0, slots), c"JSON value too deep for the Lua stack".as_ptr());
            build(state, 0);
            ffi::lua_replace(state, 1);
            ffi::lua_settop(state, 1);
        };
        // SAFETY: forwarded from the caller. The common arities are pushed from
        // references, without copying the values into a list first.
        return unsafe {
            match *args {
                [a] => lua.exec_raw::<Value>(a, protected),
                [a, b] => lua.exec_raw::<Value>((a, b), protected),
                _ => lua.exec_raw::<Value>(args.iter().map(|v| (*v).clone()).collect::<MultiValue>(), protected),
            }
        };
    }
    lua.exec_raw_lua(|raw| unsafe {
        let state = raw.state();
        let top = ffi::lua_gettop(state);
        if ffi::lua_checkstack(state, reserved(args.len(), slots)) == 0 {
            return Err(mlua::Error::runtime("Lua stack exhausted"));
        }
        for arg in args {
            raw.push_value(arg)?;
        }
        build(state, top);
        let value = raw.pop_value();
        ffi::lua_settop(state, top);
        Ok(value)
    })
}

/// Runs `read` on `value` at the top of the stack; `read` must not allocate in
/// Lua or raise, and must leave the stack as it found it.
pub fn read_value<R>(
    lua: &Lua,
    args: &[&Value],
    read: impl FnOnce(*mut ffi::lua_State, c_int) -> R,
) -> mlua::Result<R> {
    lua.exec_raw_lua(|raw| unsafe {
        let state = raw.state();
        let top = ffi::lua_gettop(state);
        if ffi::lua_checkstack(state, reserved(args.len(), 0)) == 0 {
            return Err(mlua::Error::runtime("Lua stack exhausted"));
        }
        for arg in args {
            raw.push_value(arg)?;
        }
        let result = read(state, top);
        ffi::lua_settop(state, top);
        Ok(result)
    })
}

/// Stack slots to reserve for `args` pushed values (mlua may use two per push)
/// and `slots` more, with two to spare for the result and a metatable check.
fn reserved(args: usize, slots: usize) -> c_int {
    c_int::try_from(args * 2 + slots + 2).unwrap_or(c_int::MAX)
}
