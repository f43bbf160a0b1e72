-- ordering: a keyed JetStream consumer, each order's messages in stream order.
--   agent-block dev lua/examples/ordering.lua
--   nats pub ord.o-1 '{"step":"paid"}'   (or any JetStream publish; nats-server 2.11+)
-- The key is the order id (the subject's last token): messages of one order are
-- handled one at a time, in stream order. A failure is retried after 5s, then
-- 30s, and the order's later messages wait behind it; orders in other
-- partitions go ahead meanwhile.
bus.consume({
  stream = "ORD",
  consumer = "ord",
  subject = "ord.*",
  kind = "order",
  key = "{{wildcard(1)}}",
  partitions = 6,
  max_deliver = 5,
  backoff = { "5s", "30s" },
  create_stream = { subjects = { "ord.*" } },
})

local applied = {} -- steps applied per order, in the order they were handled

bus.on("order", function(ev)
  if ev.payload.fail and ev.meta.delivered == 1 then
    error("ledger busy") -- nak: retried after 5s, later messages of the order wait
  end
  local key = ev.meta.key --[[@as string]]
  applied[key] = applied[key] or {}
  table.insert(applied[key], ev.payload.step)
  return { key = key, partition = ev.meta.partition, steps = applied[key] }
end)
