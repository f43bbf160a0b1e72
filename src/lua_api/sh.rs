//! The `sh` global: `sh.exec(command, { timeout, cwd, env, stdin })` ->
//! `{ ok, code, stdout, stderr, truncated, timed_out }`. Yields while the command
//! runs; only with `--unsafe-lua`. See [`crate::bridge::exec`] for how the
//! process group is contained.

use mlua::{Lua, Table, Value};

use crate::bridge::{self, exec};
use crate::lua::context;
use crate::lua_api::duration_of;
use crate::lua_api::raise::{error_table, raising};

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let sh = lua.create_table()?;
    sh.set("exec", raising(lua, lua.create_async_function(run)?, "sh.exec")?)?;
    lua.globals().set("sh", sh)
}

async fn run(lua: Lua, (command, opts): (String, Option<Table>)) -> mlua::Result<(Value, Value)> {
    let bridges = bridge::of(&lua);
    if !bridges.unsafe_lua() {
        return Err(mlua::Error::runtime("sh.exec is disabled: start the worker with --unsafe-lua to run commands"));
    }
    bridges.config("sh.exec")?;
    let request = request_of(command, opts.as_ref())?;
    let shown = request.command.chars().take(80).collect::<String>();
    let finished = context::within_task(exec::run(request)).await.map_err(mlua::Error::external)?;
    match finished {
        Ok(result) => {
            let table = lua.create_table()?;
            table.set("ok", result.ok())?;
            table.set("code", result.code)?;
            table.set("stdout", lua.create_string(&result.stdout)?)?;
            table.set("stderr", lua.create_string(&result.stderr)?)?;
            table.set("truncated", result.truncated)?;
            table.set("timed_out", result.timed_out)?;
            Ok((Value::Table(table), Value::Nil))
        }
        Err(err) => {
            let message = format!("sh.exec {shown:?}: cannot start: {err}");
            Ok((Value::Nil, Value::Table(error_table(&lua, 500, message)?)))
        }
    }
}

fn request_of(command: String, opts: Option<&Table>) -> mlua::Result<exec::ExecRequest> {
    let mut request = exec::ExecRequest { command, ..Default::default() };
    let Some(opts) = opts else { return Ok(request) };
    if let Some(cwd) = opts.get::<Option<String>>("cwd")? {
        request.cwd = Some(cwd.into());
    }
    if let Some(env) = opts.get::<Option<Table>>("env")? {
        for pair in env.pairs::<String, String>() {
            request.env.push(pair?);
        }
    }
    match opts.get::<Value>("stdin")? {
        Value::Nil => {}
        Value::String(s) => request.stdin = Some(s.as_bytes().to_vec()),
        other => {
            return Err(mlua::Error::runtime(format!("sh.exec: stdin must be a string, got {}", other.type_name())));
        }
    }
    match opts.get::<Value>("timeout")? {
        Value::Nil => {}
        value => request.timeout = Some(duration_of(&value, "sh.exec timeout")?),
    }
    Ok(request)
}
