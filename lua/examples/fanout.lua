-- fanout: take an event, publish it onward to several subjects.
--   agent-block dev lua/examples/fanout.lua
--   agent-block request signup '{"user":"ada","email":"ada@example.com"}' --nats-url <printed URL>
bus.subscribe("signup")

bus.on("signup", function(ev)
  local user = ev.payload
  -- Each downstream service listens on its own subject; none of them replies.
  nats.publish("email.welcome", { to = user.email, user = user.user })
  nats.publish("crm.contact", { name = user.user, email = user.email })
  nats.publish("audit.signup", ev.data, { headers = { ["Audit-Source"] = "fanout" } })
  return { ok = true }
end)
