-- echo: answers every request on `echo` with the JSON payload it received.
--   agent-block dev lua/examples/echo.lua
--   agent-block request echo '{"hello":"world"}' --nats-url <printed URL>

bus.subscribe("echo")

bus.on("echo", function(ev)
  return ev.payload
end)
