-- Run with `agent-block test` (no NATS needed).
local w = test.worker("app.lua")

test("greets by name", function()
  local out = w:send("greet", { name = "Ada" })
  test.eq(out.payload, { greeting = "Hello, Ada!" })
  test.eq(w:published("greeted")[1].payload, { name = "Ada" })
end)

test("a missing name is a 400", function()
  test.eq(w:send("greet", {}).code, 400)
end)

test("an empty name is a 422", function()
  test.eq(w:send("greet", { name = "" }).code, 422)
end)
