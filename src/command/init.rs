//! `agent-block init DIR`: a starting point for a new worker: `app.lua`, its test,
//! and the editor definitions of the Lua API with a `.luarc.json` pointing at them.
//! Existing files are kept, except the definitions, which are rewritten so they
//! match this binary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The Lua API definitions (LuaLS/EmmyLua `---@meta` files), as shipped in `lua/types`.
pub const TYPES: &[(&str, &str)] = &[
    ("agent-block.lua", include_str!("../../lua/types/agent-block.lua")),
    ("test.lua", include_str!("../../lua/types/test.lua")),
    ("validate.lua", include_str!("../../lua/types/validate.lua")),
];

const SCAFFOLD: &[(&str, &str)] = &[
    ("app.lua", include_str!("scaffold/app.lua")),
    ("app_test.lua", include_str!("scaffold/app_test.lua")),
    (".luarc.json", include_str!("scaffold/luarc.json")),
    (".emmyrc.json", include_str!("scaffold/emmyrc.json")),
];

pub fn execute(dir: PathBuf) -> ExitCode {
    match scaffold(&dir) {
        Ok(()) => {
            println!("\nnext:\n  cd {}\n  agent-block test\n  agent-block dev app.lua", dir.display());
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn scaffold(dir: &Path) -> Result<(), String> {
    let types = dir.join("types");
    std::fs::create_dir_all(&types).map_err(|err| format!("cannot create {}: {err}", types.display()))?;
    for (name, text) in SCAFFOLD {
        let path = dir.join(name);
        if path.exists() {
            println!("kept    {}", path.display());
            continue;
        }
        write(&path, text)?;
        println!("created {}", path.display());
    }
    for (name, text) in TYPES {
        let path = types.join(name);
        write(&path, text)?;
        println!("wrote   {}", path.display());
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|err| format!("cannot write {}: {err}", path.display()))
}
