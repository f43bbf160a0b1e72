//! The `sql` global: `sql.query`, `sql.exec`, `sql.transaction`, `sql.db(name)`
//! and `sql.null`. Calls yield; parameters are always bound. Failures raise
//! `{ code = 500, message }` naming the statement's database.
//!
//! A transaction's connection belongs to the `sql.transaction` call's future
//! (the `tx` functions hold it weakly), so when the handler is dropped at its
//! deadline or at shutdown the connection closes and the server rolls back,
//! rather than waiting for Lua's garbage collector.

use std::rc::{Rc, Weak};

use mlua::{Function, Lua, Table, Value};
use tokio::sync::Mutex;

use crate::bridge::sql::{Pool, Rows, Session, SqlError, SqlValue};
use crate::bridge::{self, DEFAULT_DATABASE};
use crate::lua::context;
use crate::lua_api::json;
use crate::lua_api::raise::{error_table, raising};

const SURFACE: &str = r#"
local query, exec, transaction, known, null, pcall = ...
local function handle(name)
  return {
    query = function(statement, params) return query(name, statement, params) end,
    exec = function(statement, params) return exec(name, statement, params) end,
    transaction = function(fn) return transaction(name, fn, pcall) end,
  }
end
local sql = handle(nil)
sql.null = null
function sql.db(name)
  known(name)
  return handle(name)
end
return sql
"#;

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let query = raising(lua, lua.create_async_function(query)?, "sql.query")?;
    let exec = raising(lua, lua.create_async_function(exec)?, "sql.exec")?;
    let transaction = raising(lua, lua.create_async_function(transaction)?, "sql.transaction")?;
    let known = lua.create_function(|lua, name: String| pool_of(lua, Some(&name), "sql.db").map(drop))?;
    let pcall: Function = lua.globals().get("pcall")?;
    let sql: Table = lua.load(SURFACE).set_name("=sql").call((
        query,
        exec,
        transaction,
        known,
        Value::LightUserData(null()),
        pcall,
    ))?;
    lua.globals().set("sql", sql)
}

fn null() -> mlua::LightUserData {
    mlua::LightUserData(std::ptr::null_mut())
}

type Call = (Option<String>, String, Option<Table>);

async fn query(lua: Lua, (name, statement, params): Call) -> mlua::Result<(Value, Value)> {
    let (pool, label) = pool_of(&lua, name.as_deref(), "sql.query")?;
    let params = params_of(&lua, params.as_ref(), &label)?;
    let result = context::within_task(async {
        let mut session = Session::acquire(&pool).await?;
        session.query(&statement, params).await
    })
    .await
    .map_err(mlua::Error::external)?;
    outcome(&lua, &label, result.map(|rows| rows_table(&lua, rows)))
}

async fn exec(lua: Lua, (name, statement, params): Call) -> mlua::Result<(Value, Value)> {
    let (pool, label) = pool_of(&lua, name.as_deref(), "sql.exec")?;
    let params = params_of(&lua, params.as_ref(), &label)?;
    let result = context::within_task(async {
        let mut session = Session::acquire(&pool).await?;
        session.exec(&statement, params).await
    })
    .await
    .map_err(mlua::Error::external)?;
    outcome(&lua, &label, result.map(|done| executed_table(&lua, done.affected, done.last_id)))
}

/// Commits when `body` returns, rolls back when it raises (the error goes on
/// unchanged); an interruption drops the session, which closes the connection.
async fn transaction(
    lua: Lua,
    (name, body, pcall): (Option<String>, Function, Function),
) -> mlua::Result<(Value, Value)> {
    let (pool, label) = pool_of(&lua, name.as_deref(), "sql.transaction")?;
    let mut session = match Session::acquire(&pool).await {
        Ok(session) => session,
        Err(err) => return fail(&lua, &label, err),
    };
    if let Err(err) = session.begin().await {
        return fail(&lua, &label, err);
    }
    let shared = Rc::new(Mutex::new(Some(session)));
    let tx = tx_table(&lua, Rc::downgrade(&shared), &label)?;
    let (ok, value): (bool, Value) = pcall.call_async((body, tx)).await?;
    let Some(mut session) = shared.lock().await.take() else {
        return Err(mlua::Error::runtime(format!("{label}: the transaction's connection is gone")));
    };
    if ok {
        match session.commit().await {
            Ok(()) => Ok((value, Value::Nil)),
            Err(err) => fail(&lua, &label, err),
        }
    } else {
        if let Err(err) = session.rollback().await {
            tracing::warn!(error = %err, "{label}: rollback failed; the connection is closed");
        }
        Ok((Value::Nil, value))
    }
}

type Shared = Weak<Mutex<Option<Session>>>;

fn tx_table(lua: &Lua, session: Shared, label: &str) -> mlua::Result<Table> {
    let tx = lua.create_table()?;
    let (weak, label_q) = (session.clone(), label.to_string());
    let query = lua.create_async_function(move |lua, (statement, params): (String, Option<Table>)| {
        let (weak, label) = (weak.clone(), label_q.clone());
        async move {
            let params = params_of(&lua, params.as_ref(), &label)?;
            let shared = live(&weak, &label)?;
            let mut guard = shared.lock().await;
            let session = guard.as_mut().ok_or_else(|| finished(&label))?;
            let result = session.query(&statement, params).await;
            outcome(&lua, &label, result.map(|rows| rows_table(&lua, rows)))
        }
    })?;
    let label_e = label.to_string();
    let exec = lua.create_async_function(move |lua, (statement, params): (String, Option<Table>)| {
        let (weak, label) = (session.clone(), label_e.clone());
        async move {
            let params = params_of(&lua, params.as_ref(), &label)?;
            let shared = live(&weak, &label)?;
            let mut guard = shared.lock().await;
            let session = guard.as_mut().ok_or_else(|| finished(&label))?;
            let result = session.exec(&statement, params).await;
            outcome(&lua, &label, result.map(|done| executed_table(&lua, done.affected, done.last_id)))
        }
    })?;
    tx.set("query", raising(lua, query, "tx.query")?)?;
    tx.set("exec", raising(lua, exec, "tx.exec")?)?;
    Ok(tx)
}

fn live(weak: &Shared, label: &str) -> mlua::Result<Rc<Mutex<Option<Session>>>> {
    weak.upgrade().ok_or_else(|| finished(label))
}

fn finished(label: &str) -> mlua::Error {
    mlua::Error::runtime(format!("{label}: the transaction has ended; use tx only inside its function"))
}

/// The pool for `name` (the default database when `None`) and a label for messages.
fn pool_of(lua: &Lua, name: Option<&str>, bridge: &str) -> mlua::Result<(Pool, String)> {
    let bridges = bridge::of(lua);
    let pools = bridges.pools(bridge)?;
    let key = name.unwrap_or(DEFAULT_DATABASE);
    match pools.get(key) {
        Some(pool) => Ok((
            pool.clone(),
            match name {
                Some(name) => format!("{bridge} ({name})"),
                None => bridge.to_string(),
            },
        )),
        None if name.is_none() => {
            Err(mlua::Error::runtime(format!("{bridge}: no database configured; start the worker with --sql-url")))
        }
        None => Err(mlua::Error::runtime(format!(
            "{bridge}: no database named {key:?} (configured: {}); add it with --sql {key}=URL",
            pools.names().join(", ")
        ))),
    }
}

/// A query's result as the bridge returns it: the value, or the error table.
fn outcome(lua: &Lua, label: &str, result: Result<mlua::Result<Value>, SqlError>) -> mlua::Result<(Value, Value)> {
    match result {
        Ok(value) => Ok((value?, Value::Nil)),
        Err(err) => fail(lua, label, err),
    }
}

fn fail(lua: &Lua, label: &str, err: SqlError) -> mlua::Result<(Value, Value)> {
    Ok((Value::Nil, Value::Table(error_table(lua, 500, format!("{label}: {err}"))?)))
}

fn params_of(lua: &Lua, params: Option<&Table>, label: &str) -> mlua::Result<Vec<SqlValue>> {
    let Some(params) = params else { return Ok(Vec::new()) };
    let count = params.raw_len();
    let mut values = Vec::with_capacity(count);
    for index in 1..=count {
        let value = params.raw_get::<Value>(index)?;
        values.push(
            param_of(lua, value).map_err(|err| mlua::Error::runtime(format!("{label}: parameter {index}: {err}")))?,
        );
    }
    Ok(values)
}

fn param_of(lua: &Lua, value: Value) -> Result<SqlValue, String> {
    Ok(match value {
        Value::Nil => SqlValue::Null,
        Value::LightUserData(ud) if ud.0.is_null() => SqlValue::Null,
        Value::Integer(n) => SqlValue::Int(n),
        Value::Number(n) => SqlValue::Float(n),
        Value::Boolean(b) => SqlValue::Bool(b),
        Value::String(s) => match s.to_str() {
            Ok(text) => SqlValue::Text(text.to_string()),
            Err(_) => SqlValue::Bytes(s.as_bytes().to_vec()),
        },
        Value::Table(_) => {
            let encoded = json::encode(lua, &value)?;
            SqlValue::Json(serde_json::from_slice(&encoded).map_err(|err| err.to_string())?)
        }
        other => return Err(format!("cannot bind a {} value", other.type_name())),
    })
}

fn rows_table(lua: &Lua, rows: Rows) -> mlua::Result<Value> {
    let list = lua.create_table_with_capacity(rows.rows.len(), 0)?;
    let names: Vec<mlua::LuaString> = rows.columns.iter().map(|c| lua.create_string(c)).collect::<mlua::Result<_>>()?;
    for row in rows.rows {
        let table = lua.create_table_with_capacity(0, names.len())?;
        for (name, value) in names.iter().zip(row) {
            table.raw_set(name, lua_value(lua, value)?)?;
        }
        list.raw_push(table)?;
    }
    Ok(Value::Table(list))
}

fn lua_value(lua: &Lua, value: SqlValue) -> mlua::Result<Value> {
    Ok(match value {
        SqlValue::Null => Value::LightUserData(null()),
        SqlValue::Int(n) => Value::Integer(n),
        SqlValue::Float(n) => Value::Number(n),
        SqlValue::Bool(b) => Value::Boolean(b),
        SqlValue::Text(s) => Value::String(lua.create_string(s)?),
        SqlValue::Bytes(b) => Value::String(lua.create_string(b)?),
        SqlValue::Json(j) => {
            json::decode(lua, j.to_string().as_bytes()).map_err(|err| mlua::Error::runtime(err.to_string()))?
        }
    })
}

fn executed_table(lua: &Lua, affected: u64, last_id: Option<i64>) -> mlua::Result<Value> {
    let table = lua.create_table()?;
    table.set("affected", affected)?;
    table.set("last_id", last_id)?;
    Ok(Value::Table(table))
}
