//! Bridges that fail with a `{ code, message }` table: the Rust side returns
//! `(nil, err)` and a small Lua wrapper raises `err`, so the table reaches the
//! handler (and the reply) with its fields intact.

use mlua::{Function, Lua, Table};

const WRAPPER: &str = r#"
local raw, error = ...
return function(...)
  local result, err = raw(...)
  if err ~= nil then error(err, 2) end
  return result
end
"#;

/// `raw` wrapped to raise its second return value.
pub fn raising(lua: &Lua, raw: Function, name: &str) -> mlua::Result<Function> {
    let error: Function = lua.globals().get("error")?;
    lua.load(WRAPPER).set_name(format!("={name}")).call((raw, error))
}

/// The error table bridges raise.
pub fn error_table(lua: &Lua, code: u16, message: String) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("code", code)?;
    table.set("message", message)?;
    Ok(table)
}
