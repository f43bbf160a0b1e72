//! What the sandbox keeps from a script: the worker's credential variables, and
//! Lua files outside the script's folder.

mod common;

use common::*;

/// Runs `probe.lua`'s handler once through `replay` and returns its reply.
fn replay(scripts: &Scripts, env: &[(&str, &str)], extra: &[&str]) -> serde_json::Value {
    let script = scripts.path().join("probe.lua");
    let mut args = vec!["replay", script.to_str().unwrap(), "--events", "-"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run_command_with_env(&args, env, Some(r#"{"subject":"probe"}"#));
    assert_eq!(code, 0, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    line["payload"].clone()
}

#[test]
fn the_workers_credential_variables_are_hidden_from_scripts_unless_unsafe() {
    let scripts = Scripts::new();
    scripts.write(
        "probe.lua",
        r#"
        local names = { "AGENT_BLOCK_USER", "AGENT_BLOCK_PASSWORD", "AGENT_BLOCK_TOKEN", "AGENT_BLOCK_NKEY",
          "NATS_CREDS", "AGENT_BLOCK_CREDS", "AGENT_BLOCK_TLS_KEY", "NATS_URL", "AGENT_BLOCK_NATS_URL",
          "APP_SETTING" }
        bus.on("probe", function()
          local seen = {}
          for _, name in ipairs(names) do
            seen[name] = { env = env.get(name) or false, os = os.getenv(name) or false }
          end
          return seen
        end)
        "#,
    );
    let env = [
        ("AGENT_BLOCK_USER", "alice"),
        ("AGENT_BLOCK_PASSWORD", "pw-1"),
        ("AGENT_BLOCK_TOKEN", "tok-2"),
        ("AGENT_BLOCK_NKEY", "SU-seed-3"),
        ("NATS_CREDS", "/secrets/a.creds"),
        ("AGENT_BLOCK_CREDS", "/secrets/b.creds"),
        ("AGENT_BLOCK_TLS_KEY", "/secrets/key.pem"),
        ("NATS_URL", "nats://alice:pw-1@nats:4222"),
        ("AGENT_BLOCK_NATS_URL", "nats://tok-2@nats:4222"),
        ("APP_SETTING", "visible"),
    ];
    let sandboxed = replay(&scripts, &env, &[]);
    let unsafe_lua = replay(&scripts, &env, &["--unsafe-lua"]);
    for (name, value) in env {
        let hidden = name != "APP_SETTING";
        for via in ["env", "os"] {
            let expected = if hidden { serde_json::json!(false) } else { serde_json::json!(value) };
            assert_eq!(sandboxed[name][via], expected, "{via} {name} in the sandbox");
            assert_eq!(unsafe_lua[name][via], serde_json::json!(value), "{via} {name} with --unsafe-lua");
        }
    }
    // A URL without credentials is configuration a script may read.
    let plain = replay(&scripts, &[("NATS_URL", "nats://nats:4222")], &[]);
    assert_eq!(plain["NATS_URL"]["env"], "nats://nats:4222");
}

#[test]
fn require_stays_inside_the_scripts_folder() {
    let outside = tempfile::Builder::new().prefix("outside").tempdir().unwrap();
    std::fs::write(outside.path().join("evil.lua"), "error('EVIL MODULE LOADED')").unwrap();
    let evil = outside.path().join("evil");
    let evil = evil.to_str().unwrap();
    let scripts = Scripts::new();
    scripts.write("lib/util.lua", "return { answer = 42 }");
    let dotted = evil.replace('/', ".");
    let relative_up = format!("../{}/evil", outside.path().file_name().unwrap().to_str().unwrap());
    for name in [evil, dotted.as_str(), relative_up.as_str(), "..", "lib..util", "lib/../lib/util"] {
        let script = scripts.write("app.lua", &format!("local m = require({name:?})\nbus.on('a', function() end)\n"));
        let (code, _, stderr) = run_command(&["check", script.to_str().unwrap()], None);
        assert_eq!(code, 2, "require({name:?}) must fail: {stderr}");
        assert!(stderr.contains("refused") && stderr.contains("script's folder"), "require({name:?}): {stderr}");
        assert!(!stderr.contains("EVIL MODULE LOADED"), "require({name:?}) ran the module: {stderr}");
    }
    let script = scripts.write(
        "app.lua",
        "local a = require('lib.util')\nlocal b = require('lib/util')\nassert(a.answer == 42 and b.answer == 42)\n\
         assert(require('validate'))\nbus.on('a', function() end)\n",
    );
    let (code, _, stderr) = run_command(&["check", script.to_str().unwrap()], None);
    assert_eq!(code, 0, "modules next to the script and embedded ones load: {stderr}");
}

#[cfg(unix)]
#[test]
fn a_symbolic_link_out_of_the_scripts_folder_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("evil.lua"), "error('EVIL MODULE LOADED')").unwrap();
    let scripts = Scripts::new();
    std::os::unix::fs::symlink(outside.path().join("evil.lua"), scripts.path().join("linked.lua")).unwrap();
    let script = scripts.write("app.lua", "require('linked')\n");
    let (code, _, stderr) = run_command(&["check", script.to_str().unwrap()], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("outside the script's folder") && !stderr.contains("EVIL"), "{stderr}");
}

/// Reads each of `names` through `env.get` and `os.getenv` in one `replay` run.
fn read_variables(env: &[(&str, &str)], names: &[&str]) -> serde_json::Value {
    let scripts = Scripts::new();
    scripts.write(
        "probe.lua",
        r#"
        bus.on("probe", function(ev)
          local seen = {}
          for _, name in ipairs(ev.payload) do
            seen[name] = { env = env.get(name) or false, os = os.getenv(name) or false }
          end
          return seen
        end)
        "#,
    );
    let script = scripts.path().join("probe.lua");
    let event = serde_json::json!({ "subject": "probe", "payload": names }).to_string();
    let args = ["replay", script.to_str().unwrap(), "--events", "-"];
    let (code, stdout, stderr) = run_command_with_env(&args, env, Some(&event));
    assert_eq!(code, 0, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    line["payload"].clone()
}

#[test]
fn scripts_cannot_read_the_sql_password_or_the_otlp_headers() {
    let env = [
        ("AGENT_BLOCK_SQL_URL", "postgres://u:pgpass@h/db"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=collector-key"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization=Bearer trace-token"),
    ];
    let names: Vec<&str> = env.iter().map(|(name, _)| *name).collect();
    let seen = read_variables(&env, &names);
    for name in names {
        for via in ["env", "os"] {
            assert_eq!(seen[name][via], false, "{via} {name} reads a secret");
        }
    }
}

/// A value for `variable` that carries a secret, and one that carries none (for a
/// URL setting, the same URL without credentials; `None` when every value is secret).
fn secret_and_plain(variable: &agent_block::config::SecretVariable) -> (String, Option<String>) {
    use agent_block::config::Secret;
    match variable.secret {
        Secret::Value => (format!("secret-of-{}", variable.name), None),
        Secret::Url => {
            (format!("scheme://user:secret-of-{}@host:1/db", variable.name), Some("scheme://host:1/db".to_string()))
        }
    }
}

#[test]
fn every_setting_marked_secret_is_hidden_from_env_get_and_os_getenv() {
    let variables = agent_block::config::secret_variables();
    let names: Vec<&str> = variables.iter().map(|v| v.name.as_str()).collect();
    // The walk finds the settings defined on the command line, their aliases and
    // the OTLP variables read by the exporter.
    for expected in [
        "AGENT_BLOCK_PASSWORD",
        "AGENT_BLOCK_TOKEN",
        "AGENT_BLOCK_NKEY",
        "AGENT_BLOCK_USER",
        "AGENT_BLOCK_CREDS",
        "NATS_CREDS",
        "AGENT_BLOCK_TLS_KEY",
        "AGENT_BLOCK_NATS_URL",
        "NATS_URL",
        "AGENT_BLOCK_SQL_URL",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        assert!(names.contains(&expected), "{expected} is not marked secret: {names:?}");
    }
    let values: Vec<(String, (String, Option<String>))> =
        variables.iter().map(|v| (v.name.clone(), secret_and_plain(v))).collect();
    let secret_env: Vec<(&str, &str)> =
        values.iter().map(|(name, (secret, _))| (name.as_str(), secret.as_str())).collect();
    let mut probe = names.clone();
    probe.push("APP_SETTING");
    let mut env = secret_env.clone();
    env.push(("APP_SETTING", "visible"));
    let seen = read_variables(&env, &probe);
    for name in &names {
        for via in ["env", "os"] {
            assert_eq!(seen[name][via], false, "{via} {name} reads a secret");
        }
    }
    assert_eq!(seen["APP_SETTING"]["env"], "visible");
    assert_eq!(seen["APP_SETTING"]["os"], "visible");
    // A URL setting without credentials is configuration a script may read.
    let plain_env: Vec<(&str, &str)> =
        values.iter().filter_map(|(name, (_, plain))| plain.as_deref().map(|p| (name.as_str(), p))).collect();
    assert!(!plain_env.is_empty());
    let plain_names: Vec<&str> = plain_env.iter().map(|(name, _)| *name).collect();
    let seen = read_variables(&plain_env, &plain_names);
    for (name, value) in &plain_env {
        assert_eq!(seen[name]["env"], *value, "env {name}");
        assert_eq!(seen[name]["os"], *value, "os {name}");
    }
}

/// Each probe run in a handler through `replay`: whether it raised.
const HOST_ACCESS: &str = r#"
local dir = DIR
local probes = {
  os_remove = function() return os.remove(dir .. "/victim.txt") end,
  os_rename = function() return os.rename(dir .. "/renamed.txt", dir .. "/moved.txt") end,
  os_tmpname = function() return os.tmpname() end,
  os_execute = function() return os.execute("true") end,
  os_exit = function() return os.exit end,
  io_open = function() return io.open(dir .. "/module.lua") end,
  dofile = function() return dofile(dir .. "/module.lua") end,
  loadfile = function() return loadfile(dir .. "/module.lua")() end,
  debug = function() return debug.getinfo(1) end,
  loadlib = function() return package.loadlib(dir .. "/cmod.so", "luaopen_cmod") end,
  c_module = function() return require("cmod") end,
  binary_chunk = function() return load(string.dump(function() return 1 end))() end,
}
bus.on("probe", function()
  local allowed = {}
  for name, probe in pairs(probes) do
    local ok, result = pcall(probe)
    allowed[name] = ok and result ~= nil
  end
  allowed.init_module = require("pkg").name == "pkg/init.lua"
  return allowed
end)
"#;

#[test]
fn the_sandbox_keeps_scripts_from_the_host_and_unsafe_lua_lifts_it() {
    let scripts = Scripts::new();
    let dir = scripts.path().to_str().unwrap();
    scripts.write("victim.txt", "still here");
    scripts.write("renamed.txt", "still here");
    scripts.write("module.lua", "return 'loaded from a file'");
    // Not a loadable library: the sandbox must refuse before trying to load it.
    scripts.write("cmod.so", "not a shared object");
    scripts.write("pkg/init.lua", "return { name = 'pkg/init.lua' }");
    let script = scripts.write("probe.lua", &HOST_ACCESS.replace("DIR", &format!("{dir:?}")));
    let run = |extra: &[&str]| {
        let mut args = vec!["replay", script.to_str().unwrap(), "--events", "-"];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = run_command(&args, Some(r#"{"subject":"probe"}"#));
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(stdout.trim()).unwrap()["payload"].clone()
    };
    let sandboxed = run(&[]);
    for name in [
        "os_remove",
        "os_rename",
        "os_tmpname",
        "os_execute",
        "os_exit",
        "io_open",
        "dofile",
        "loadfile",
        "debug",
        "loadlib",
        "c_module",
        "binary_chunk",
    ] {
        assert_eq!(sandboxed[name], false, "{name} is reachable in the sandbox: {sandboxed}");
    }
    assert_eq!(sandboxed["init_module"], true, "name/init.lua modules load: {sandboxed}");
    assert_eq!(std::fs::read_to_string(scripts.path().join("victim.txt")).unwrap(), "still here");
    assert!(scripts.path().join("renamed.txt").exists());

    let lifted = run(&["--unsafe-lua"]);
    let unsafe_allows =
        ["os_remove", "os_rename", "os_tmpname", "os_execute", "os_exit", "io_open", "dofile", "loadfile", "debug"];
    for name in unsafe_allows.into_iter().chain(["binary_chunk"]) {
        assert_eq!(lifted[name], true, "{name} with --unsafe-lua: {lifted}");
    }
    assert!(!scripts.path().join("victim.txt").exists(), "os.remove works with --unsafe-lua");
}
