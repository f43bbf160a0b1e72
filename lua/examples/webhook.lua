-- webhook: forwards each `orders.created` event to an HTTP endpoint and answers
-- with the endpoint's status. A failing endpoint becomes an error reply (502).
--   agent-block dev lua/examples/webhook.lua --http-allow hooks.example.com
--   agent-block request orders.created '{"id":42}' --nats-url <printed URL>
-- WEBHOOK_URL overrides the destination.

local url = env.get("WEBHOOK_URL") or "https://hooks.example.com/orders"

bus.subscribe("orders.created")

bus.on("orders.created", function(ev)
  local response = http.post(url, ev.payload, {
    headers = { ["x-event-id"] = ev.id },
    timeout = "5s",
  })
  if response.status >= 300 then
    error({ code = 502, message = "webhook answered " .. response.status })
  end
  log.info("webhook delivered", { status = response.status })
  return { delivered = true, status = response.status }
end)
