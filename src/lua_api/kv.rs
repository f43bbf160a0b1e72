//! The `kv` global: JetStream key-value buckets, the state shared by the whole
//! pool. Every call yields while it waits. Tables are stored as JSON and read back
//! as tables; strings are stored as bytes and read back as strings (a string that
//! holds a JSON object or array reads back as a table).
//!
//! Failures raise `{ code, message }` tables like handler errors: 404 for a
//! missing bucket, 409 for a failed compare-and-set, 500 otherwise.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::TryStreamExt;
use mlua::{Lua, MultiValue, Table, Value};

use crate::lua::state::VmState;
use crate::lua_api::{body_of, duration_of, json};

/// The raw functions return `(results..., error)`; these wrappers raise the error
/// table with the caller's location, as `nats.request` does.
const WRAPPERS: &str = r#"
local raw = ...
local failure = { __tostring = function(e) return e.message end }
local kv = {}
for name, fn in pairs(raw) do
  kv[name] = function(...)
    local a, b, err = fn(...)
    if err then error(setmetatable(err, failure), 2) end
    return a, b
  end
end
return kv
"#;

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let raw = lua.create_table()?;
    raw.set("get", lua.create_async_function(get)?)?;
    raw.set("put", lua.create_async_function(put)?)?;
    raw.set("create", lua.create_async_function(create)?)?;
    raw.set("update", lua.create_async_function(update)?)?;
    raw.set("delete", lua.create_async_function(delete)?)?;
    raw.set("keys", lua.create_async_function(keys)?)?;
    raw.set("bucket", lua.create_async_function(bucket)?)?;
    let kv = raising(lua, raw)?;
    lua.globals().set("kv", kv)
}

/// The `kv` table over `raw` functions returning `(results..., error)`: each
/// raises its error table (printable with `tostring`) at the caller's line.
/// `agent-block test` wraps its in-memory store with it too.
pub fn raising(lua: &Lua, raw: Table) -> mlua::Result<Table> {
    lua.load(WRAPPERS).set_name("=kv").call(raw)
}

/// The message of a failed compare-and-set.
pub fn conflict_message(bucket: &str, key: &str, expected: impl std::fmt::Display) -> String {
    format!("kv.update {bucket}/{key}: revision {expected} is no longer the latest")
}

/// A failure as the `(nil, nil, error)` the wrappers raise.
struct Failure {
    code: u16,
    message: String,
}

impl Failure {
    fn new(code: u16, message: impl Into<String>) -> Self {
        Failure { code, message: message.into() }
    }

    fn into_lua(self, lua: &Lua) -> mlua::Result<MultiValue> {
        let table = lua.create_table()?;
        table.set("code", self.code)?;
        table.set("message", self.message)?;
        Ok(MultiValue::from_iter([Value::Nil, Value::Nil, Value::Table(table)]))
    }
}

type Outcome = Result<(Value, Value), Failure>;

fn returned(lua: &Lua, outcome: Outcome) -> mlua::Result<MultiValue> {
    match outcome {
        Ok((a, b)) => Ok(MultiValue::from_iter([a, b])),
        Err(failure) => failure.into_lua(lua),
    }
}

/// Buckets opened by this VM, by name.
#[derive(Default)]
struct Buckets(RefCell<HashMap<String, kv::Store>>);

fn context(lua: &Lua, what: &str) -> Result<jetstream::Context, Failure> {
    let state = VmState::of(lua);
    match state.transport.client() {
        Some(client) => Ok(jetstream::new(client.clone())),
        None => Err(Failure::new(500, format!("{what}: no NATS connection here (kv needs `run` or `dev`)"))),
    }
}

async fn store(lua: &Lua, bucket: &str, what: &str) -> Result<kv::Store, Failure> {
    if lua.app_data_ref::<Buckets>().is_none() {
        lua.set_app_data(Buckets::default());
    }
    if let Some(store) = lua.app_data_ref::<Buckets>().and_then(|b| b.0.borrow().get(bucket).cloned()) {
        return Ok(store);
    }
    let js = context(lua, what)?;
    let store = js.get_key_value(bucket).await.map_err(|err| {
        if err.kind() == jetstream::context::KeyValueErrorKind::InvalidStoreName {
            Failure::new(400, format!("{what}: invalid bucket name {bucket:?}"))
        } else {
            Failure::new(
                404,
                format!("{what}: bucket {bucket:?} does not exist; create it with kv.bucket({bucket:?}) ({err})"),
            )
        }
    })?;
    if let Some(buckets) = lua.app_data_ref::<Buckets>() {
        buckets.0.borrow_mut().insert(bucket.to_string(), store.clone());
    }
    Ok(store)
}

/// A stored value as Lua: JSON objects and arrays as tables, anything else as
/// the string of its bytes.
/// A stored value as a handler reads it back: JSON objects and arrays as
/// tables, anything else as the bytes it is.
pub fn value_of(lua: &Lua, bytes: &[u8]) -> mlua::Result<Value> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{') | Some(b'['))
        && let Ok(value) = json::decode(lua, bytes)
    {
        return Ok(value);
    }
    Ok(Value::String(lua.create_string(bytes)?))
}

fn stored(lua: &Lua, value: &Value, what: &str) -> Result<Bytes, Failure> {
    match value {
        Value::Nil => Err(Failure::new(400, format!("{what}: value is nil; use kv.delete to remove a key"))),
        value => body_of(lua, value).map_err(|err| Failure::new(400, format!("{what}: {err}"))),
    }
}

fn revision(revision: u64) -> Value {
    Value::Integer(revision as i64)
}

async fn get(lua: Lua, (bucket, key): (String, String)) -> mlua::Result<MultiValue> {
    let outcome = async {
        let store = store(&lua, &bucket, "kv.get").await?;
        match store.entry(key.as_str()).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                let value = value_of(&lua, &entry.value).map_err(|err| Failure::new(500, err.to_string()))?;
                Ok((value, revision(entry.revision)))
            }
            Ok(_) => Ok((Value::Nil, Value::Nil)),
            Err(err) => Err(Failure::new(500, format!("kv.get {bucket}/{key}: {err}"))),
        }
    }
    .await;
    returned(&lua, outcome)
}

async fn put(lua: Lua, (bucket, key, value): (String, String, Value)) -> mlua::Result<MultiValue> {
    let outcome = async {
        let data = stored(&lua, &value, "kv.put")?;
        let store = store(&lua, &bucket, "kv.put").await?;
        let written = store
            .put(key.as_str(), data)
            .await
            .map_err(|err| Failure::new(500, format!("kv.put {bucket}/{key}: {err}")))?;
        Ok((revision(written), Value::Nil))
    }
    .await;
    returned(&lua, outcome)
}

async fn create(lua: Lua, (bucket, key, value): (String, String, Value)) -> mlua::Result<MultiValue> {
    let outcome = async {
        let data = stored(&lua, &value, "kv.create")?;
        let store = store(&lua, &bucket, "kv.create").await?;
        match store.create(key.as_str(), data).await {
            Ok(written) => Ok((revision(written), Value::Nil)),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => Ok((Value::Nil, Value::Nil)),
            Err(err) => Err(Failure::new(500, format!("kv.create {bucket}/{key}: {err}"))),
        }
    }
    .await;
    returned(&lua, outcome)
}

async fn update(lua: Lua, (bucket, key, value, expected): (String, String, Value, u64)) -> mlua::Result<MultiValue> {
    let outcome = async {
        let data = stored(&lua, &value, "kv.update")?;
        let store = store(&lua, &bucket, "kv.update").await?;
        match store.update(key.as_str(), data, expected).await {
            Ok(written) => Ok((revision(written), Value::Nil)),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(Failure::new(409, conflict_message(&bucket, &key, expected)))
            }
            Err(err) => Err(Failure::new(500, format!("kv.update {bucket}/{key}: {err}"))),
        }
    }
    .await;
    returned(&lua, outcome)
}

async fn delete(lua: Lua, (bucket, key): (String, String)) -> mlua::Result<MultiValue> {
    let outcome = async {
        let store = store(&lua, &bucket, "kv.delete").await?;
        store
            .delete(key.as_str())
            .await
            .map_err(|err| Failure::new(500, format!("kv.delete {bucket}/{key}: {err}")))?;
        Ok((Value::Nil, Value::Nil))
    }
    .await;
    returned(&lua, outcome)
}

async fn keys(lua: Lua, (bucket, prefix): (String, Option<String>)) -> mlua::Result<MultiValue> {
    let outcome = async {
        let store = store(&lua, &bucket, "kv.keys").await?;
        let failed = |err: &dyn std::fmt::Display| Failure::new(500, format!("kv.keys {bucket}: {err}"));
        let listed: Vec<String> =
            store.keys().await.map_err(|e| failed(&e))?.try_collect().await.map_err(|e| failed(&e))?;
        let mut keys: Vec<String> =
            listed.into_iter().filter(|key| prefix.as_deref().is_none_or(|p| key.starts_with(p))).collect();
        keys.sort();
        let list = lua.create_sequence_from(keys).map_err(|err| Failure::new(500, err.to_string()))?;
        Ok((Value::Table(list), Value::Nil))
    }
    .await;
    returned(&lua, outcome)
}

/// The stream behind a key-value bucket, as the NATS clients lay it out. Made
/// here rather than by `create_key_value`, whose account query fails to parse
/// nats-server 2.9's answer.
fn bucket_stream(name: &str, history: i64, ttl: Duration) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: history,
        max_age: ttl,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    }
}

/// `kv.bucket(name, { history, ttl })`: creates the bucket when missing; safe to
/// call from every VM at once.
async fn bucket(lua: Lua, (name, opts): (String, Option<Table>)) -> mlua::Result<MultiValue> {
    let history = match &opts {
        Some(opts) => opts.get::<Option<i64>>("history")?.unwrap_or(1),
        None => 1,
    };
    let ttl = match opts.as_ref().map(|o| o.get::<Value>("ttl")).transpose()? {
        None | Some(Value::Nil) => Duration::ZERO,
        Some(value) => duration_of(&value, "kv.bucket ttl")?,
    };
    let outcome = async {
        if !(1..=64).contains(&history) {
            return Err(Failure::new(400, "kv.bucket: history must be between 1 and 64"));
        }
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(Failure::new(
                400,
                format!("kv.bucket: invalid bucket name {name:?} (letters, digits, - and _)"),
            ));
        }
        let js = context(&lua, "kv.bucket")?;
        if js.get_key_value(name.as_str()).await.is_ok() {
            return Ok((Value::Boolean(false), Value::Nil));
        }
        match js.create_stream(bucket_stream(&name, history, ttl)).await {
            Ok(_) => Ok((Value::Boolean(true), Value::Nil)),
            // Another VM or worker created it first.
            Err(_) if js.get_key_value(name.as_str()).await.is_ok() => Ok((Value::Boolean(false), Value::Nil)),
            Err(err) => Err(Failure::new(500, format!("kv.bucket {name:?}: {err}"))),
        }
    }
    .await;
    returned(&lua, outcome)
}
