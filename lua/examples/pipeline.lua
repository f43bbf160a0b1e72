-- pipeline: a JetStream stage with retries, backoff and a dead-letter subject.
--   agent-block dev lua/examples/pipeline.lua
--   nats pub orders.paid.eu '{"id":"o-1","sku":"a"}'   (or any JetStream publish)
-- Paid orders are reserved at the warehouse, then published as fulfilled. A
-- failure is retried after 10s, 1m, 10m; the 4th failed delivery goes to
-- `orders.dead` with the error in its headers.
bus.consume({
  stream = "ORDERS",
  consumer = "fulfil",
  subject = "orders.paid.>",
  kind = "fulfil",
  max_deliver = 4,
  backoff = { "10s", "1m", "10m" },
  dead_letter = "orders.dead",
  create_stream = { subjects = { "orders.paid.>" } },
})

bus.on("fulfil", function(ev)
  local order = ev.payload -- not JSON: dead-lettered at once (a retry cannot fix it)
  local ok, err = pcall(nats.request, "warehouse.reserve", { id = order.id, sku = order.sku }, { timeout = "2s" })
  if not ok then
    local failure = err --[[@as agent_block.Error]] -- pcall hands back what was raised
    if failure.code == 409 then
      return bus.term("out of stock: " .. order.sku) -- no retry, no dead letter
    end
    error(failure) -- nak with the next backoff; dead letter after max_deliver
  end
  nats.publish("orders.fulfilled", { id = order.id, attempt = ev.meta.delivered })
  return true
end)
