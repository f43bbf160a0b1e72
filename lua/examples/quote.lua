-- quote: calls another service with nats.request and combines the answers.
--   agent-block dev lua/examples/quote.lua
--   (run a `pricing.get` responder, e.g. another worker), then
--   agent-block request quote '{"sku":"a","qty":3}' --nats-url <printed URL>
bus.subscribe("quote")

bus.on("quote", function(ev)
  local want = ev.payload
  -- Raises { code = 503 } when nobody answers, { code = 504 } on timeout, or the
  -- responder's own error code: let it fail the request, or handle it.
  local ok, price = pcall(nats.request, "pricing.get", { sku = want.sku }, { timeout = "1s" })
  if not ok then
    local failure = price --[[@as agent_block.Error]] -- pcall hands back what was raised
    if failure.code == 404 then
      error({ code = 404, message = "unknown sku " .. want.sku })
    end
    error({ code = 502, message = "pricing unavailable: " .. tostring(failure.message) })
  end
  return { sku = want.sku, qty = want.qty, total = price.payload.unit * want.qty }
end)
