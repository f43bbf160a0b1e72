-- Tests for echo.lua:  agent-block test lua/examples/echo_test.lua
local w = test.worker("echo.lua")

test("echoes the JSON payload", function()
  local out = w:send("echo", { hello = "world" })
  test.eq(out.outcome, "ack")
  test.eq(out.payload, { hello = "world" })
end)

test("answers an empty request with an empty body", function()
  local out = w:send("echo")
  test.eq(out.data, "")
end)

test("rejects a body that is not JSON with 400", function()
  local out = w:send("echo", "not json")
  test.eq(out.code, 400)
end)
