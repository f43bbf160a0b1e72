//! The `env` global (`env.get(name)`) and `os.getenv`, which see the worker's
//! environment except its own credentials: a script must not be able to read the
//! password, token or seed the worker connects with (nor the paths of its creds
//! file and TLS key, its database URL with a password or its OTLP headers) unless
//! the operator lifts the sandbox with `--unsafe-lua`. Which variables those are
//! follows from the settings marked secret ([`crate::secrets`]).

use mlua::{Lua, Table};

/// Whether a script may read `name` (whose value is `value`) from the environment.
pub fn visible_to_scripts(name: &str, value: &str) -> bool {
    !crate::secrets::is_secret_variable(name, value)
}

/// Installs `env.get` and replaces `os.getenv`; with `hide_credentials` both
/// answer nil for the worker's credential variables.
pub fn install(lua: &Lua, hide_credentials: bool) -> mlua::Result<()> {
    let get = lua.create_function(move |_, name: String| {
        Ok(std::env::var(&name).ok().filter(|value| !hide_credentials || visible_to_scripts(&name, value)))
    })?;
    let env = lua.create_table()?;
    env.set("get", get.clone())?;
    lua.globals().set("env", env)?;
    if let Ok(os) = lua.globals().get::<Table>("os") {
        os.set("getenv", get)?;
    }
    Ok(())
}
