//! The event table handed to handlers. `kind`, `id`, `subject`, `reply` and `data`
//! are plain fields; `payload`, `headers` and `meta` are built on first access and
//! cached in the table, so a handler pays only for what it reads.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use std::ffi::c_char;

use mlua::{Lua, Table, UserData, Value, ffi};

use crate::event::{Event, StreamMeta};
use crate::lua_api::{json, raw};

/// A body that the handler read as `ev.payload` is not JSON: the event fails with 400.
#[derive(Debug, thiserror::Error)]
#[error("payload is not valid JSON: {0}")]
pub struct PayloadError(pub String);

/// Key of the hidden per-event data the lazy fields are built from.
const EXTRA: &str = "\0event";
/// The keys every event table gets, kept as Lua strings in the metatable's array
/// part (at these positions) so building a table does not hash them again.
const KEYS: [&str; 6] = ["kind", "id", "subject", "reply", "data", EXTRA];
const EXTRA_KEY: usize = 5;

struct EventExtra {
    headers: Option<HeaderMap>,
    received: SystemTime,
    trace_id: Option<String>,
    span_id: Option<String>,
    stream: Option<StreamMeta>,
}

impl UserData for EventExtra {}

/// Builds event tables; holds the metatable shared by all of them on one VM.
pub struct EventTables {
    metatable: Table,
}

impl EventTables {
    pub fn new(lua: &Lua) -> mlua::Result<Self> {
        let metatable = lua.create_table()?;
        // Kept as a Lua string, so reading the body does not hash its key again.
        let data_key = lua.create_string("data")?;
        metatable.set(
            "__index",
            lua.create_function(move |lua, (table, key): (Table, Value)| lazy_field(lua, &data_key, table, key))?,
        )?;
        for (index, key) in KEYS.into_iter().enumerate() {
            metatable.raw_set(index + 1, key)?;
        }
        Ok(EventTables { metatable })
    }

    /// Builds the table in one raw section: this runs for every event, and
    /// per-field mlua calls cost more than the fields themselves. `span` is the
    /// (trace id, span id) of the handler's span, when spans are exported.
    pub fn build(&self, lua: &Lua, event: &Event, span: Option<(&str, &str)>) -> mlua::Result<Table> {
        // Core messages without headers (most) skip the userdata: the receipt time
        // is all the lazy fields need.
        let extra = if event.headers.is_some() || event.stream.is_some() || span.is_some() {
            Value::UserData(lua.create_userdata(EventExtra {
                headers: event.headers.clone(),
                received: event.received,
                trace_id: span.map(|(trace, _)| trace).or_else(|| event.trace_id()).map(str::to_string),
                span_id: span.map(|(_, span)| span.to_string()),
                stream: event.stream.as_deref().cloned(),
            })?)
        } else {
            Value::Number(seconds_since_epoch(event.received))
        };
        let values: [Option<&[u8]>; 5] = [
            Some(event.kind.as_bytes()),
            Some(event.id.as_str().as_bytes()),
            Some(event.subject.as_bytes()),
            event.reply.as_ref().map(|r| r.as_bytes()),
            Some(&event.data),
        ];
        let metatable = Value::Table(self.metatable.clone());
        // SAFETY: the builder pushes one table using 3 slots and holds only
        // references.
        let table = unsafe {
            raw::build_value(lua, &[&metatable, &extra], 3, |state, base| {
                ffi::lua_createtable(state, 0, 8);
                for (index, value) in values.into_iter().enumerate() {
                    if let Some(value) = value {
                        ffi::lua_rawgeti(state, base + 1, index as ffi::lua_Integer + 1);
                        push_bytes(state, value);
                        ffi::lua_rawset(state, -3);
                    }
                }
                ffi::lua_rawgeti(state, base + 1, EXTRA_KEY as ffi::lua_Integer + 1);
                ffi::lua_pushvalue(state, base + 2);
                ffi::lua_rawset(state, -3);
                ffi::lua_pushvalue(state, base + 1);
                ffi::lua_setmetatable(state, -2);
            })
        }?;
        match table {
            Value::Table(table) => Ok(table),
            _ => unreachable!("the builder pushes a table"),
        }
    }
}

fn lazy_field(lua: &Lua, data_key: &mlua::LuaString, table: Table, key: Value) -> mlua::Result<Value> {
    let Value::String(key) = key else { return Ok(Value::Nil) };
    let value = match &*key.as_bytes() {
        b"payload" => payload(lua, &table, data_key)?,
        b"headers" => Value::Table(match extra(&table)? {
            Extra::Full(extra) => headers_table(lua, extra.headers.as_ref())?,
            Extra::ReceivedAt(_) => lua.create_table()?,
        }),
        b"meta" => Value::Table(meta(lua, &table)?),
        _ => return Ok(Value::Nil),
    };
    table.raw_set(key, &value)?;
    Ok(value)
}

unsafe fn push_bytes(state: *mut ffi::lua_State, bytes: &[u8]) {
    unsafe { ffi::lua_pushlstring(state, bytes.as_ptr() as *const c_char, bytes.len()) };
}

fn seconds_since_epoch(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The hidden per-event data: headers, receipt time and trace id.
enum Extra {
    Full(mlua::UserDataRef<EventExtra>),
    ReceivedAt(f64),
}

fn extra(table: &Table) -> mlua::Result<Extra> {
    match table.raw_get::<Value>(EXTRA)? {
        Value::UserData(data) => Ok(Extra::Full(data.borrow::<EventExtra>()?)),
        Value::Number(received) => Ok(Extra::ReceivedAt(received)),
        _ => Err(mlua::Error::runtime("not an event table")),
    }
}

fn payload(lua: &Lua, table: &Table, data_key: &mlua::LuaString) -> mlua::Result<Value> {
    let data: mlua::LuaString = table.raw_get(data_key)?;
    let bytes = data.as_bytes();
    if bytes.is_empty() {
        return Ok(Value::Nil);
    }
    match json::decode(lua, &bytes) {
        Ok(value) => Ok(value),
        Err(json::DecodeError::Json(err)) => Err(mlua::Error::external(PayloadError(err.to_string()))),
        Err(json::DecodeError::Lua(err)) => Err(err),
    }
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
    let meta = lua.create_table()?;
    meta.raw_set("subject", table.raw_get::<Value>("subject")?)?;
    meta.raw_set("reply", table.raw_get::<Value>("reply")?)?;
    match extra(table)? {
        Extra::Full(extra) => {
            meta.raw_set("trace_id", extra.trace_id.as_deref())?;
            meta.raw_set("span_id", extra.span_id.as_deref())?;
            match &extra.stream {
                Some(stream) => {
                    meta.raw_set("stream", &*stream.stream)?;
                    meta.raw_set("consumer", &*stream.consumer)?;
                    meta.raw_set("delivered", stream.delivered)?;
                    meta.raw_set("stream_seq", stream.stream_sequence)?;
                    meta.raw_set("pending", stream.pending)?;
                    meta.raw_set("timestamp", seconds_since_epoch(stream.published))?;
                }
                None => {
                    meta.raw_set("delivered", 1)?;
                    meta.raw_set("timestamp", seconds_since_epoch(extra.received))?;
                }
            }
        }
        Extra::ReceivedAt(received) => {
            meta.raw_set("delivered", 1)?;
            meta.raw_set("timestamp", received)?;
        }
    }
    Ok(meta)
}
