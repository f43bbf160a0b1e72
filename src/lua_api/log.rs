//! The `log` global: structured logs tagged with the current event's kind, id,
//! trace id and span id. `log.info("charged", { amount = 12 })`. `print` writes an
//! info record the same way, so raw text never breaks a JSON log stream.

use mlua::{Lua, Value};

use crate::event::trace_id_of;
use crate::lua::context;

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let log = lua.create_table()?;
    for level in ["debug", "info", "warn", "error"] {
        log.set(
            level,
            lua.create_function(move |_, (message, fields): (Value, Option<Value>)| {
                emit(level, &message.to_string()?, fields.as_ref());
                Ok(())
            })?,
        )?;
    }
    lua.globals().set("log", log)?;
    let print = lua.create_function(|_, values: mlua::Variadic<Value>| {
        let parts: Vec<String> = values.iter().map(|value| value.to_string()).collect::<mlua::Result<_>>()?;
        emit("info", &parts.join("\t"), None);
        Ok(())
    })?;
    lua.globals().set("print", print)
}

fn emit(level: &str, message: &str, fields: Option<&Value>) {
    let current = context::current();
    let kind = current.as_ref().and_then(|c| c.kind.as_deref()).unwrap_or("");
    let id = current.as_ref().and_then(|c| c.id.as_ref()).map(|id| id.as_str()).unwrap_or("");
    let trace_id = current.as_ref().and_then(|c| c.traceparent.as_deref()).and_then(trace_id_of).unwrap_or("");
    let span_id = current.as_ref().and_then(|c| c.span_id()).unwrap_or("");
    let fields = fields
        .map(|f| serde_json::to_string(f).unwrap_or_else(|err| format!("<unencodable fields: {err}>")))
        .unwrap_or_default();
    match level {
        "debug" => tracing::debug!(target: "lua", kind, id, trace_id, span_id, fields, "{message}"),
        "info" => tracing::info!(target: "lua", kind, id, trace_id, span_id, fields, "{message}"),
        "warn" => tracing::warn!(target: "lua", kind, id, trace_id, span_id, fields, "{message}"),
        _ => tracing::error!(target: "lua", kind, id, trace_id, span_id, fields, "{message}"),
    }
}
