//! The `time` global: `time.now()` (seconds since the epoch),
//! `time.sleep(duration)` (yields).

use std::time::{SystemTime, UNIX_EPOCH};

use mlua::{Lua, Value};

use crate::lua_api::duration_of;

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let time = lua.create_table()?;
    time.set(
        "now",
        lua.create_function(|_, ()| {
            Ok(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0))
        })?,
    )?;
    time.set(
        "sleep",
        lua.create_async_function(|_, duration: Value| async move {
            let duration = duration_of(&duration, "time.sleep")?;
            if duration.is_zero() {
                // `time.sleep(0)` lets the rest of the VM run, its connection included.
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(duration).await;
            }
            Ok(())
        })?,
    )?;
    lua.globals().set("time", time)
}
