//! Makes every piece of Lua code a handler causes stoppable at its deadline.
//!
//! - Interruptions cannot be caught: where the hook raises them rather than
//!   suspending the code (see [`crate::lua::context::yield_for_interrupt`]),
//!   `pcall`, `xpcall` and `coroutine.resume` raise them again instead of
//!   returning them, so they unwind to the dispatcher even from
//!   `while true do pcall(f) end`, and even inside C code (`table.sort`) where a
//!   coroutine cannot be suspended.
//! - The watchdog can reach coroutines a script runs: `coroutine.resume`, `wrap` and
//!   `close` record the coroutine they run (see [`crate::lua::watchdog`]), and the
//!   handler runner records the handler's own coroutine.
//! - Finalizers run as handler code: Lua runs `__gc` with hooks disabled, so a
//!   looping finalizer could never be interrupted. `setmetatable` replaces a
//!   metatable's `__gc` with one that queues the object, and the queue runs at the
//!   end of the next handler, under that handler's deadline. (Finalizers still
//!   queued when the VM closes are not run.)

use std::ffi::c_int;

use mlua::{Function, Lua, ffi};

use crate::lua::context;
use crate::lua::watchdog;

const GUARDS: &str = r#"
local raw_pcall, raw_xpcall, create, interrupted, resume, close = pcall, xpcall, coroutine.create, ...
local error, type = error, type
local function check(ok, ...)
  if not ok and interrupted() then error((...), 0) end
  return ok, ...
end
pcall = function(f, ...) return check(raw_pcall(f, ...)) end
xpcall = function(f, handler, ...) return check(raw_xpcall(f, handler, ...)) end
coroutine.resume = function(co, ...) return check(resume(co, ...)) end
coroutine.close = function(co) return check(close(co)) end
local function unwrap(co, ok, ...)
  if ok then return ... end
  local err = ...
  if interrupted() then error(err, 0) end
  if coroutine.status(co) == "dead" then close(co) end
  -- as the built-in wrap: a string error gets the caller's position
  error(err, type(err) == "string" and 2 or 0)
end
coroutine.wrap = function(f)
  local co = create(f)
  return function(...) return unwrap(co, resume(co, ...)) end
end
"#;

const FINALIZERS: &str = r#"
local raw_setmetatable, rawget, rawset, type, pcall = setmetatable, rawget, rawset, type, pcall
local queue, queued = {}, 0
local deferred = raw_setmetatable({}, { __mode = "k" })
setmetatable = function(t, mt)
  if type(mt) == "table" then
    local gc = rawget(mt, "__gc")
    if gc ~= nil and not deferred[gc] then
      local function defer(object)
        queued = queued + 1; queue[queued] = gc
        queued = queued + 1; queue[queued] = object
      end
      deferred[defer] = true
      rawset(mt, "__gc", defer)
    end
  end
  return raw_setmetatable(t, mt)
end
local function run_queue()
  while queued > 0 do
    local list, count = queue, queued
    queue, queued = {}, 0
    for i = 1, count, 2 do pcall(list[i], list[i + 1]) end
  end
end
-- ends a handler: runs queued finalizers, then returns the handler's results
return function(...)
  if queued > 0 then run_queue() end
  return ...
end
"#;

/// Registry name of the unguarded `pcall`, for the dispatcher's own call.
const RAW_PCALL: &str = "agent_block.raw_pcall";
/// Registry name of the function that runs queued finalizers.
const FINISH: &str = "agent_block.finish";

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let globals = lua.globals();
    lua.set_named_registry_value(RAW_PCALL, globals.get::<Function>("pcall")?)?;
    let coroutines: mlua::Table = globals.get("coroutine")?;
    let resume = tracked(lua, coroutines.get("resume")?)?;
    let close = tracked(lua, coroutines.get("close")?)?;
    let interrupted = lua.create_function(|_, ()| Ok(context::current().is_some_and(|c| c.interrupted().is_some())))?;
    lua.load(GUARDS).set_name("=interrupt guards").call::<()>((interrupted, resume, close))?;
    let finish: Function = lua.load(FINALIZERS).set_name("=finalizers").call(())?;
    lua.set_named_registry_value(FINISH, finish)
}

/// The function that runs a handler: `runner(handler, extra)` builds the event
/// table with `build(extra)` (see [`crate::lua_api::event::EventTables`]), calls
/// `pcall(handler, ev)` (errors come back as values, so tables keep their
/// fields, and the dispatcher sees interruptions too), then the finalizers
/// queued meanwhile.
pub fn runner(lua: &Lua, build: &Function) -> mlua::Result<Function> {
    lua.load(
        "local pcall, enter, finish, build = ...
         return function(handler, extra) enter() return finish(pcall(handler, build(extra))) end",
    )
    .set_name("=handler")
    .call((raw_pcall(lua)?, enter_function(lua)?, lua.named_registry_value::<Function>(FINISH)?, build))
}

/// `chunk` wrapped so the coroutine that runs it is known to the watchdog.
pub fn entered(lua: &Lua, chunk: Function) -> mlua::Result<Function> {
    lua.load("local enter, chunk = ...; return function(...) enter() return chunk(...) end")
        .set_name("=main")
        .call((enter_function(lua)?, chunk))
}

/// The original `pcall`: the dispatcher catches everything, interruptions included.
pub fn raw_pcall(lua: &Lua) -> mlua::Result<Function> {
    lua.named_registry_value(RAW_PCALL)
}

fn enter_function(lua: &Lua) -> mlua::Result<Function> {
    // SAFETY: `enter` keeps the C function protocol (no arguments used, no results).
    unsafe { lua.create_c_function(enter) }
}

/// Records the calling coroutine as the current task's thread.
unsafe extern "C-unwind" fn enter(state: *mut ffi::lua_State) -> c_int {
    context::enter_thread(state);
    0
}

/// `function(co, ...)` that calls `run(co, ...)` (the built-in `coroutine.resume`
/// or `close`) with `co` recorded as running.
fn tracked(lua: &Lua, run: Function) -> mlua::Result<Function> {
    // SAFETY: pushes exactly one value, a closure over `run`, within the
    // `LUA_MINSTACK` slots every C frame has.
    unsafe { lua.exec_raw(run, |state| ffi::lua_pushcclosure(state, run_tracked, 1)) }
}

unsafe extern "C-unwind" fn run_tracked(state: *mut ffi::lua_State) -> c_int {
    // SAFETY: a C function called by Lua with its upvalue; errors are caught by
    // `lua_pcall` before the coroutine is forgotten, and nothing owned lives on this
    // frame when `lua_error` unwinds it. It pushes one value above its arguments
    // (within `LUA_MINSTACK`); `lua_pcall` makes room for the results itself.
    unsafe {
        let nargs = ffi::lua_gettop(state);
        let coroutine = if ffi::lua_type(state, 1) == ffi::LUA_TTHREAD {
            ffi::lua_tothread(state, 1)
        } else {
            std::ptr::null_mut()
        };
        ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
        ffi::lua_insert(state, 1);
        let mark = watchdog::enter(coroutine);
        let status = ffi::lua_pcall(state, nargs, ffi::LUA_MULTRET, 0);
        watchdog::leave(mark);
        if status != ffi::LUA_OK {
            ffi::lua_error(state);
        }
        ffi::lua_gettop(state)
    }
}
