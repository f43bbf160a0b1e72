//! Building a VM's Lua state: standard libraries, the sandbox, the memory limit and
//! `require` of modules next to the script or embedded in the binary.

use std::path::Path;

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaOptions, StdLib, Value};

use crate::lua_api::raw::MemoryLimited;
use crate::settings::LuaConfig;

/// Lua libraries shipped inside the binary, found by `require(name)`.
const EMBEDDED: &[(&str, &str)] = &[("validate", include_str!("../../lua/lib/validate.lua"))];

/// Removes what lets a script reach the host: processes, files, native code, binary
/// chunks, and the debug library (which can break out of any sandbox).
const SANDBOX: &str = r##"
local raw_load, select, searchers = load, select, package.searchers
load = function(chunk, name, _, ...)
  -- an explicit nil env differs from none, so pass env only when given
  if select("#", ...) > 0 then return raw_load(chunk, name, "t", ...) end
  return raw_load(chunk, name, "t")
end
dofile, loadfile, io = nil, nil, nil
package.loaded.io = nil
for _, name in ipairs({ "execute", "exit", "remove", "rename", "tmpname", "setlocale" }) do
  os[name] = nil
end
package.loadlib, package.cpath, package.path = nil, "", ""
for i = #searchers, 2, -1 do searchers[i] = nil end
"##;

/// `collectgarbage` without what would change the collector for every handler of
/// the VM (`stop`, `restart`, `incremental`, `generational`, `setpause`,
/// `setstepmul`): a script may measure and run the collector, not turn it off.
const COLLECTGARBAGE: &str = r##"
local raw_collect, tostring, error = collectgarbage, tostring, error
local allowed = { collect = true, count = true, step = true, isrunning = true }
collectgarbage = function(option, ...)
  option = option or "collect"
  if not allowed[option] then
    error("collectgarbage(\"" .. tostring(option) .. "\") is not allowed: it would change the collector for "
      .. "every handler of this VM (allowed: collect, count, step, isrunning)", 2)
  end
  return raw_collect(option, ...)
end
"##;

/// Finished handler coroutines kept for reuse, at most: creating a coroutine per
/// event costs more than running a small handler.
const MAX_SPARE_COROUTINES: usize = 256;

/// A VM for `concurrency` handlers in flight.
pub fn new_lua(config: &LuaConfig, script_dir: &Path, concurrency: usize) -> mlua::Result<Lua> {
    let options = LuaOptions::new().thread_pool_size(concurrency.min(MAX_SPARE_COROUTINES));
    let lua = if config.unsafe_lua {
        // SAFETY: `--unsafe-lua` is the operator's explicit request for the debug library.
        unsafe { Lua::unsafe_new_with(StdLib::ALL, options) }
    } else {
        Lua::new_with(StdLib::ALL_SAFE, options)?
    };
    if !config.unsafe_lua {
        lua.load(SANDBOX).set_name("=sandbox").exec()?;
        lua.load(COLLECTGARBAGE).set_name("=collectgarbage").exec()?;
    }
    install_searcher(&lua, script_dir, !config.unsafe_lua)?;
    crate::lua_api::env::install(&lua, !config.unsafe_lua)?;
    if let Some(limit) = config.memory_limit {
        lua.set_memory_limit(limit)?;
        lua.set_app_data(MemoryLimited);
    }
    Ok(lua)
}

/// Loads a script file as text (binary chunks are refused unless unsafe).
pub fn load_file(lua: &Lua, path: &Path, text_only: bool) -> mlua::Result<Function> {
    let source =
        std::fs::read(path).map_err(|err| mlua::Error::runtime(format!("cannot read {}: {err}", path.display())))?;
    let chunk = lua.load(source).set_name(format!("@{}", path.display()));
    if text_only { chunk.set_mode(ChunkMode::Text) } else { chunk }.into_function()
}

/// `require` looks in the embedded libraries, then next to the script
/// (`name.lua`, `name/init.lua`, dots as folders). In the sandbox a name can only
/// reach files inside the script's folder: absolute paths, `..` and empty parts
/// (`".etc.x"` would otherwise become `/etc/x`) are refused with an error.
fn install_searcher(lua: &Lua, script_dir: &Path, sandboxed: bool) -> mlua::Result<()> {
    let dir = script_dir.to_path_buf();
    let searcher = lua.create_function(move |lua, name: String| {
        if let Some((_, source)) = EMBEDDED.iter().find(|(module, _)| *module == name) {
            let loader = lua.load(*source).set_name(format!("=embedded:{name}")).into_function()?;
            return Ok((Value::Function(loader), Value::Nil));
        }
        let relative = match module_path(&name) {
            Ok(relative) => relative,
            // Outside the sandbox the standard searchers may still find it.
            Err(_) if !sandboxed => return Ok((Value::Nil, Value::Nil)),
            Err(problem) => return Err(refused(&name, &dir, problem)),
        };
        let candidates = [dir.join(format!("{relative}.lua")), dir.join(&relative).join("init.lua")];
        for path in &candidates {
            if path.is_file() {
                if sandboxed && !inside(&dir, path) {
                    return Err(refused(&name, &dir, "it resolves to a file outside the script's folder"));
                }
                let loader = load_file(lua, path, sandboxed)?;
                let path = lua.create_string(path.display().to_string())?;
                return Ok((Value::Function(loader), Value::String(path)));
            }
        }
        let tried: Vec<String> = candidates.iter().map(|p| format!("\n\tno file '{}'", p.display())).collect();
        Ok((Value::String(lua.create_string(tried.concat())?), Value::Nil))
    })?;
    let searchers: mlua::Table = lua.globals().get::<mlua::Table>("package")?.get("searchers")?;
    searchers.raw_insert(2, searcher)
}

/// `a.b.c` (or `a/b/c`) as the relative path `a/b/c`; every part must be a plain
/// file or folder name.
fn module_path(name: &str) -> Result<String, &'static str> {
    let parts: Vec<&str> = name.split(['.', '/']).collect();
    for part in &parts {
        if part.is_empty() {
            return Err("absolute paths and empty parts are not module names");
        }
        if part.contains(['\\', '\0', ':']) || *part == "~" {
            return Err("module names are made of plain file and folder names");
        }
    }
    Ok(parts.join("/"))
}

/// Whether `path` (an existing file) lies inside `dir` once symbolic links are
/// resolved.
fn inside(dir: &Path, path: &Path) -> bool {
    match (dir.canonicalize(), path.canonicalize()) {
        (Ok(dir), Ok(path)) => path.starts_with(dir),
        _ => false,
    }
}

fn refused(name: &str, dir: &Path, problem: &str) -> mlua::Error {
    mlua::Error::runtime(format!(
        "require({name:?}) refused: {problem}; modules are found only inside the script's folder ({}) and the embedded libraries",
        dir.display()
    ))
}
