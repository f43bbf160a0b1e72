-- app: a request/reply handler. Try it:
--   agent-block dev app.lua
--   agent-block request greet '{"name":"Ada"}' --nats-url <the URL dev printed>
-- Test it offline:  agent-block test
local validate = require("validate")

bus.subscribe("greet")

bus.on("greet", function(ev)
  local req = validate.fields(ev.payload, { name = "string" })
  if req.name == "" then
    error({ code = 422, message = "name must not be empty" })
  end
  nats.publish("greeted", { name = req.name })
  return { greeting = "Hello, " .. req.name .. "!" }
end)
