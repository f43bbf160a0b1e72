//! Building Lua values directly on the Lua stack, for the per-event work where
//! mlua's per-value handles cost more than the work itself.
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
        let protected = |state: *mut ffi::lua_State| unsafe {
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
        let needed = c_int::try_from(args.len() * 2 + slots + 2).unwrap_or(c_int::MAX);
        if ffi::lua_checkstack(state, needed) == 0 {
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
        let needed = c_int::try_from(args.len() * 2 + 2).unwrap_or(c_int::MAX);
        if ffi::lua_checkstack(state, needed) == 0 {
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
