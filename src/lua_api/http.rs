//! The `http` global: `http.request(url, opts)`, `http.get(url, opts)` and
//! `http.post(url, body, opts)`. Calls yield; transport failures raise
//! `{ code = 502|504, message }` naming the URL without its credentials, while an
//! HTTP error status is an ordinary response.

use std::time::Duration;

use bytes::Bytes;
use mlua::{Function, Lua, Table, Value};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use crate::bridge::http_exchange::HttpResponse;
use crate::bridge::{self, http_client};
use crate::lua::context;
use crate::lua_api::raise::{error_table, raising};
use crate::lua_api::{duration_of, json};

/// A request's time limit unless `timeout` says otherwise; the handler's
/// deadline cuts it shorter.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// `json` on a response decodes the body on first access; `get` and `post`
/// fill in the method and body.
const SURFACE: &str = r#"
local request, decode, setmetatable, rawset, pairs = ...
local response_meta = {
  __index = function(response, key)
    if key == "json" then
      local value = decode(response.body)
      rawset(response, "json", value)
      return value
    end
  end,
}
local function with(opts, method, body)
  local copy = {}
  for k, v in pairs(opts or {}) do copy[k] = v end
  copy.method = copy.method or method
  if body ~= nil then copy.body = body end
  return copy
end
local http = {}
function http.request(url, opts) return setmetatable(request(url, opts), response_meta) end
function http.get(url, opts) return http.request(url, with(opts, "GET")) end
function http.post(url, body, opts) return http.request(url, with(opts, "POST", body)) end
return http
"#;

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let request = raising(lua, lua.create_async_function(request)?, "http.request")?;
    let json: Table = lua.globals().get("json")?;
    let decode: Function = json.get("decode")?;
    let globals = lua.globals();
    let http: Table = lua.load(SURFACE).set_name("=http").call((
        request,
        decode,
        globals.get::<Function>("setmetatable")?,
        globals.get::<Function>("rawset")?,
        globals.get::<Function>("pairs")?,
    ))?;
    globals.set("http", http)
}

async fn request(lua: Lua, (url, opts): (String, Option<Table>)) -> mlua::Result<(Value, Value)> {
    let bridges = bridge::of(&lua);
    let (exchange, config) = bridges.http("http.request")?;
    let max_body = config.http_max_body;
    let parsed = reqwest::Url::parse(&url)
        .map_err(|err| mlua::Error::runtime(format!("http.request: invalid URL {:?}: {err}", shown(&url))))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(mlua::Error::runtime(format!("http.request: {} is not an http(s) URL", shown(&url))));
    }
    if !http_client::allowed(&config.http_allow, &parsed) {
        let message = format!("http.request: {} is not allowed by --http-allow", host_of(&parsed));
        return Ok((Value::Nil, Value::Table(error_table(&lua, 403, message)?)));
    }
    let built = build(&lua, parsed, opts.as_ref())?;
    let label = format!("{} {}", built.method(), without_credentials(built.url()));
    let sent = context::within_task(exchange.exchange(built, max_body)).await.map_err(mlua::Error::external)?;
    match sent {
        Ok(response) => Ok((Value::Table(response_table(&lua, response)?), Value::Nil)),
        Err(failure) => {
            let message = format!("http.request {label}: {}", failure.message);
            Ok((Value::Nil, Value::Table(error_table(&lua, failure.code, message)?)))
        }
    }
}

fn build(lua: &Lua, url: reqwest::Url, opts: Option<&Table>) -> mlua::Result<reqwest::Request> {
    let get =
        |key: &str| -> mlua::Result<Value> { opts.map(|o| o.get(key)).transpose().map(Option::unwrap_or_default) };
    let method = match get("method")? {
        Value::Nil => reqwest::Method::GET,
        Value::String(s) => reqwest::Method::from_bytes(s.to_str()?.to_ascii_uppercase().as_bytes())
            .map_err(|_| mlua::Error::runtime(format!("http.request: invalid method {:?}", s.to_string_lossy())))?,
        other => {
            return Err(mlua::Error::runtime(format!(
                "http.request: method must be a string, got {}",
                other.type_name()
            )));
        }
    };
    let mut headers = match get("headers")? {
        Value::Nil => HeaderMap::new(),
        Value::Table(table) => headers_of(&table)?,
        other => {
            return Err(mlua::Error::runtime(format!(
                "http.request: headers must be a table, got {}",
                other.type_name()
            )));
        }
    };
    let body = match get("body")? {
        Value::Nil => None,
        Value::String(s) => Some(Bytes::copy_from_slice(&s.as_bytes())),
        other => {
            let encoded = json::encode(lua, &other)
                .map_err(|err| mlua::Error::runtime(format!("http.request: cannot encode the body as JSON: {err}")))?;
            headers.entry(CONTENT_TYPE).or_insert(HeaderValue::from_static("application/json"));
            Some(Bytes::from(encoded))
        }
    };
    if let Some(traceparent) = context::current().and_then(|c| c.traceparent.clone())
        && let Ok(value) = HeaderValue::from_str(&traceparent)
    {
        headers.entry("traceparent").or_insert(value);
    }
    let timeout = match get("timeout")? {
        Value::Nil => DEFAULT_TIMEOUT,
        value => duration_of(&value, "http.request timeout")?,
    };
    let mut request = reqwest::Request::new(method, url);
    *request.headers_mut() = headers;
    *request.timeout_mut() = Some(timeout);
    *request.body_mut() = body.map(reqwest::Body::from);
    Ok(request)
}

fn headers_of(table: &Table) -> mlua::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    let invalid = |name: &str| mlua::Error::runtime(format!("http.request: invalid header {name:?}"));
    for pair in table.pairs::<String, Value>() {
        let (name, value) = pair?;
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid(&name))?;
        let values: Vec<String> = match value {
            Value::Table(list) => list.sequence_values::<String>().collect::<mlua::Result<_>>()?,
            other => vec![other.to_string()?],
        };
        for value in values {
            headers.append(header.clone(), HeaderValue::from_str(&value).map_err(|_| invalid(&name))?);
        }
    }
    Ok(headers)
}

fn response_table(lua: &Lua, response: HttpResponse) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("status", response.status)?;
    let headers = lua.create_table()?;
    for name in response.headers.keys() {
        let values: Vec<&str> = response.headers.get_all(name).iter().map(|v| v.to_str().unwrap_or_default()).collect();
        headers.set(name.as_str(), values.join(", "))?;
    }
    table.set("headers", headers)?;
    table.set("body", lua.create_string(&response.body)?)?;
    Ok(table)
}

fn without_credentials(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

fn shown(url: &str) -> String {
    reqwest::Url::parse(url).map(|u| without_credentials(&u)).unwrap_or_else(|_| bridge::redact_url(url))
}

fn host_of(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        _ => url.to_string(),
    }
}
