//! The event table handed to handlers. `kind`, `id`, `subject`, `reply` and `data`
//! are plain fields; `payload`, `headers` and `meta` are built on first access and
//! cached in the table, so a handler pays only for what it reads.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use mlua::{AnyUserData, Lua, Table, UserData, Value};

use crate::event::Event;
use crate::lua_api::json;

/// A body that the handler read as `ev.payload` is not JSON: the event fails with 400.
#[derive(Debug, thiserror::Error)]
#[error("payload is not valid JSON: {0}")]
pub struct PayloadError(pub String);

/// Key of the hidden per-event data the lazy fields are built from.
const EXTRA: &str = "\0event";

struct EventExtra {
    headers: Option<HeaderMap>,
    received: SystemTime,
    trace_id: Option<String>,
}

impl UserData for EventExtra {}

/// Builds event tables; holds the metatable shared by all of them on one VM.
pub struct EventTables {
    metatable: Table,
}

impl EventTables {
    pub fn new(lua: &Lua) -> mlua::Result<Self> {
        let metatable = lua.create_table()?;
        metatable.set("__index", lua.create_function(lazy_field)?)?;
        Ok(EventTables { metatable })
    }

    pub fn build(&self, lua: &Lua, event: &Event) -> mlua::Result<Table> {
        let table = lua.create_table_with_capacity(0, 8)?;
        table.raw_set("kind", event.kind.as_str())?;
        table.raw_set("id", event.id.as_str())?;
        table.raw_set("subject", event.subject.as_str())?;
        if let Some(reply) = &event.reply {
            table.raw_set("reply", reply.as_str())?;
        }
        table.raw_set("data", lua.create_string(&event.data)?)?;
        let extra = EventExtra {
            headers: event.headers.clone(),
            received: event.received,
            trace_id: event.trace_id().map(str::to_string),
        };
        table.raw_set(EXTRA, lua.create_userdata(extra)?)?;
        table.set_metatable(Some(self.metatable.clone()))?;
        Ok(table)
    }
}

fn lazy_field(lua: &Lua, (table, key): (Table, Value)) -> mlua::Result<Value> {
    let Value::String(key) = key else { return Ok(Value::Nil) };
    let value = match &*key.as_bytes() {
        b"payload" => payload(lua, &table)?,
        b"headers" => Value::Table(headers_table(lua, extra(&table)?.headers.as_ref())?),
        b"meta" => Value::Table(meta(lua, &table)?),
        _ => return Ok(Value::Nil),
    };
    table.raw_set(key, &value)?;
    Ok(value)
}

fn extra(table: &Table) -> mlua::Result<mlua::UserDataRef<EventExtra>> {
    table.raw_get::<AnyUserData>(EXTRA)?.borrow::<EventExtra>()
}

fn payload(lua: &Lua, table: &Table) -> mlua::Result<Value> {
    let data: mlua::LuaString = table.raw_get("data")?;
    let bytes = data.as_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Nil);
    }
    json::decode(lua, &bytes).map_err(|err| mlua::Error::external(PayloadError(err.to_string())))
}

/// Header name -> value, or a list of values when the header repeats.
pub fn headers_table(lua: &Lua, headers: Option<&HeaderMap>) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
        let name = name.to_string();
        if let [single] = values.as_slice() {
            table.raw_set(name, single.as_str())?;
        } else {
            let list = lua.create_sequence_from(values.iter().map(|v| v.as_str()))?;
            table.raw_set(name, list)?;
        }
    }
    Ok(table)
}

fn meta(lua: &Lua, table: &Table) -> mlua::Result<Table> {
    let extra = extra(table)?;
    let meta = lua.create_table()?;
    meta.raw_set("subject", table.raw_get::<Value>("subject")?)?;
    meta.raw_set("reply", table.raw_get::<Value>("reply")?)?;
    meta.raw_set("delivered", 1)?;
    let timestamp = extra.received.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    meta.raw_set("timestamp", timestamp)?;
    meta.raw_set("trace_id", extra.trace_id.as_deref())?;
    Ok(meta)
}
