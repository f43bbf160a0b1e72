//! The Lua API: `bus`, `nats`, `kv`, `json`, `log`, `time`, `env`, `http`, `sql`,
//! `sh`, and the event table.

pub mod bus;
pub mod env;
pub mod event;
pub mod http;
pub mod interrupt;
pub mod json;
pub mod json_to_stack;
pub mod kv;
pub mod log;
pub mod nats;
pub mod packed_fields;
pub mod raise;
pub mod raw;
pub mod sh;
pub mod sql;
pub mod time;

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use mlua::{Lua, Table, Value};

use crate::duration::{parse_duration, seconds_to_duration};
use crate::headers;

/// Installs every global of the Lua API into `lua`.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    interrupt::install(lua)?;
    bus::install(lua)?;
    nats::install(lua)?;
    kv::install(lua)?;
    json::install(lua)?;
    log::install(lua)?;
    time::install(lua)?;
    http::install(lua)?;
    sql::install(lua)?;
    sh::install(lua)
}

/// A duration given as a humantime string or a number of seconds.
pub fn duration_of(value: &Value, what: &str) -> mlua::Result<Duration> {
    let parsed = match value {
        Value::Integer(n) => seconds_to_duration(*n as f64),
        Value::Number(n) => seconds_to_duration(*n),
        Value::String(s) => parse_duration(&s.to_str()?),
        other => Err(format!("expected a duration like \"2s\", got {}", other.type_name())),
    };
    parsed.map_err(|err| mlua::Error::runtime(format!("{what}: {err}")))
}

/// A message body: strings as bytes, nil as empty, anything else as JSON.
pub fn body_of(lua: &Lua, value: &Value) -> mlua::Result<Bytes> {
    match value {
        Value::Nil => Ok(Bytes::new()),
        Value::String(s) => Ok(Bytes::copy_from_slice(&s.as_bytes())),
        other => json::encode(lua, other)
            .map(Bytes::from)
            .map_err(|err| mlua::Error::runtime(format!("cannot encode {} as JSON: {err}", other.type_name()))),
    }
}

/// Headers from a Lua table of name -> string (or list of strings).
pub fn headers_of(table: &Table) -> mlua::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for pair in table.pairs::<String, Value>() {
        let (name, value) = pair?;
        match value {
            Value::Table(list) => {
                for item in list.sequence_values::<String>() {
                    headers::append(&mut headers, &name, &item?).map_err(mlua::Error::runtime)?;
                }
            }
            Value::String(s) => headers::insert(&mut headers, &name, &s.to_str()?).map_err(mlua::Error::runtime)?,
            Value::Integer(_) | Value::Number(_) | Value::Boolean(_) => {
                headers::insert(&mut headers, &name, &value.to_string()?).map_err(mlua::Error::runtime)?
            }
            other => {
                return Err(mlua::Error::runtime(format!(
                    "header {name:?}: expected a string or a list of strings, got {}",
                    other.type_name()
                )));
            }
        }
    }
    Ok(headers)
}
