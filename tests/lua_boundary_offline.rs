//! The Lua boundary's generated JSON in one process, through `agent-block test`
//! (the real dispatch, event table and reply encoder, no NATS): the test that
//! `tests/memcheck` runs under valgrind, where the system allocator lets memcheck
//! see a write past the Lua stack even when it does not crash.

#[path = "common/json_shapes.rs"]
mod json_shapes;

use std::fmt::Write;
use std::process::ExitCode;

use clap::Parser;

const APP: &str = r#"
bus.subscribe("fz.>", { kind = "{{wildcard(1)}}" })
bus.on("echo", function(ev) return ev.payload end)
"#;

/// Fewer random shapes under valgrind (`AGENT_BLOCK_SHAPES`), where each costs
/// fifty times more.
fn random_shapes() -> usize {
    std::env::var("AGENT_BLOCK_SHAPES").ok().and_then(|n| n.parse().ok()).unwrap_or(300)
}

#[test]
fn generated_json_roundtrips_in_process() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.lua"), APP).unwrap();
    let mut cases = String::new();
    for (name, text) in json_shapes::shapes(0x5eed_4321, random_shapes()) {
        let valid = serde_json::from_str::<serde_json::Value>(&text).is_ok();
        writeln!(cases, "  {{ {name:?}, {valid}, [=====[{text}]=====] }},").unwrap();
    }
    let test_file = format!(
        r#"local w = test.worker("app.lua")
local cases = {{
{cases}}}
test("every shape is answered and the VM stays sound", function()
  for _, case in ipairs(cases) do
    local name, valid, text = case[1], case[2], case[3]
    local out = w:send("fz.echo", text)
    if valid then
      test.eq(out.outcome, "ack", name)
    else
      test.eq(out.code, 400, name)
    end
    test.eq(w:send("fz.echo", '{{"plain":[1,"two"]}}').payload, {{ plain = {{ 1, "two" }} }}, "after " .. name)
  end
end)
"#
    );
    std::fs::write(dir.path().join("boundary_test.lua"), test_file).unwrap();
    let cli = agent_block::cli::Cli::parse_from(["agent-block", "test", dir.path().to_str().unwrap()]);
    assert_eq!(agent_block::command::execute(cli), ExitCode::SUCCESS);
}
