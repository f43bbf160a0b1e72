//! The `nats` global: `publish` and `request` from handlers. Both yield while they
//! wait, carry the current `traceparent`, send tables as JSON and strings as bytes.

use std::time::Duration;

use async_nats::HeaderMap;
use mlua::{Function, Lua, Table, Value};

use crate::lua::context;
use crate::lua::state::VmState;
use crate::lua_api::event::headers_table;
use crate::lua_api::{body_of, duration_of, headers_of, json};
use crate::settle::service_error;
use crate::telemetry::carrier;
use crate::transport::TransportError;

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `nats.request` raises the error table the raw bridge returns, so failures carry
/// a code like handler errors do.
const REQUEST_WRAPPER: &str = r#"
local raw = ...
return function(subject, data, opts)
  local response, err = raw(subject, data, opts)
  if err then error(err, 2) end
  return response
end
"#;

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let nats = lua.create_table()?;
    nats.set("publish", lua.create_async_function(publish)?)?;
    let raw_request = lua.create_async_function(request)?;
    let request: Function = lua.load(REQUEST_WRAPPER).set_name("=nats.request").call(raw_request)?;
    nats.set("request", request)?;
    lua.globals().set("nats", nats)
}

struct Outgoing {
    subject: String,
    headers: Option<HeaderMap>,
    data: bytes::Bytes,
}

fn outgoing(lua: &Lua, subject: String, data: &Value, opts: Option<&Table>, what: &str) -> mlua::Result<Outgoing> {
    if subject.is_empty() || subject.contains(char::is_whitespace) {
        return Err(mlua::Error::runtime(format!("{what}: invalid subject {subject:?}")));
    }
    let mut headers = match opts.map(|o| o.get::<Option<Table>>("headers")).transpose()?.flatten() {
        Some(table) => Some(headers_of(&table)?),
        None => None,
    };
    if let Some(current) = context::current()
        && let Some(traceparent) = current.traceparent.as_deref()
    {
        let headers = headers.get_or_insert_with(HeaderMap::new);
        // Trace headers the handler set itself win.
        if carrier::header(headers, carrier::TRACEPARENT).is_none() {
            carrier::set_trace_headers(headers, traceparent, current.tracestate.as_deref());
        }
    }
    Ok(Outgoing { subject, headers, data: body_of(lua, data)? })
}

async fn publish(lua: Lua, (subject, data, opts): (String, Value, Option<Table>)) -> mlua::Result<()> {
    let message = outgoing(&lua, subject, &data, opts.as_ref(), "nats.publish")?;
    let transport = VmState::of(&lua).transport.clone();
    transport
        .publish(message.subject.into(), message.headers, message.data)
        .await
        .map_err(|err| mlua::Error::runtime(format!("nats.publish: {err}")))
}

async fn request(lua: Lua, (subject, data, opts): (String, Value, Option<Table>)) -> mlua::Result<(Value, Value)> {
    let message = outgoing(&lua, subject, &data, opts.as_ref(), "nats.request")?;
    let timeout = match opts.as_ref().map(|o| o.get::<Value>("timeout")).transpose()? {
        None | Some(Value::Nil) => DEFAULT_REQUEST_TIMEOUT,
        Some(value) => duration_of(&value, "nats.request timeout")?,
    };
    let transport = VmState::of(&lua).transport.clone();
    let response = match transport.request(message.subject, message.headers, message.data, timeout).await {
        Ok(response) => response,
        Err(err) => return Ok((Value::Nil, Value::Table(request_error(&lua, &err)?))),
    };
    if let Some((code, message)) = service_error(response.headers.as_ref()) {
        let table = lua.create_table()?;
        table.set("code", code)?;
        table.set("message", message)?;
        return Ok((Value::Nil, Value::Table(table)));
    }
    let table = lua.create_table()?;
    table.set("data", lua.create_string(&response.data)?)?;
    if !response.data.is_empty()
        && let Ok(payload) = json::decode(&lua, &response.data)
    {
        table.set("payload", payload)?;
    }
    table.set("headers", headers_table(&lua, response.headers.as_ref())?)?;
    Ok((Value::Table(table), Value::Nil))
}

fn request_error(lua: &Lua, err: &TransportError) -> mlua::Result<Table> {
    let code = match err {
        TransportError::NoResponders(_) => 503,
        TransportError::TimedOut { .. } => 504,
        TransportError::TooLarge { .. } | TransportError::Failed(_) | TransportError::Unavailable(..) => 500,
    };
    let table = lua.create_table()?;
    table.set("code", code)?;
    table.set("message", format!("nats.request: {err}"))?;
    Ok(table)
}
