//! Keeps a timed-out or cancelled handler from catching its own interruption:
//! `pcall`, `xpcall` and `coroutine.resume` raise the interruption again instead
//! of returning it, so it unwinds to the dispatcher even from a loop like
//! `while true do pcall(f) end`, and even inside C code (`table.sort`) where a
//! coroutine cannot be suspended.

use mlua::{Function, Lua};

use crate::vm::context;

const GUARDS: &str = r#"
local raw_pcall, raw_xpcall, raw_resume, interrupted = pcall, xpcall, coroutine.resume, ...
local function check(ok, ...)
  if not ok and interrupted() then error((...), 0) end
  return ok, ...
end
pcall = function(f, ...) return check(raw_pcall(f, ...)) end
xpcall = function(f, handler, ...) return check(raw_xpcall(f, handler, ...)) end
coroutine.resume = function(co, ...) return check(raw_resume(co, ...)) end
"#;

/// Registry name of the unguarded `pcall`, for the dispatcher's own call.
const RAW_PCALL: &str = "agent_block.raw_pcall";

pub fn install(lua: &Lua) -> mlua::Result<()> {
    lua.set_named_registry_value(RAW_PCALL, lua.globals().get::<Function>("pcall")?)?;
    let interrupted = lua.create_function(|_, ()| Ok(context::current().is_some_and(|c| c.interrupted().is_some())))?;
    lua.load(GUARDS).set_name("=interrupt guards").call(interrupted)
}

/// The original `pcall`: the dispatcher catches everything, interruptions included.
pub fn raw_pcall(lua: &Lua) -> mlua::Result<Function> {
    lua.named_registry_value(RAW_PCALL)
}
