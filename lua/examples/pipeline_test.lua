local w = test.worker("pipeline.lua")

test("a reserved order is acked and published onward", function()
  test.respond("warehouse.reserve", { reserved = true })
  local out = w:send("orders.paid.eu", { id = "o-1", sku = "a" })
  test.eq(out.outcome, "ack")
  test.eq(w:published("orders.fulfilled")[1].payload, { id = "o-1", attempt = 1 })
end)

test("a failure is nak'ed with the consumer's backoff", function()
  local out = w:send("orders.paid.eu", { id = "o-2", sku = "a" }, { delivered = 2 })
  test.eq(out.outcome, "nak")
  test.eq(out.delay, 60)
  test.eq(out.code, 503) -- no responder: the error the handler raised
end)

test("retries on the virtual clock, then succeeds", function()
  local calls = 0
  test.respond("warehouse.reserve", function()
    calls = calls + 1
    if calls < 3 then error({ code = 500, message = "warehouse busy" }) end
    return { reserved = true }
  end)
  local started = w:now()
  local out = w:consume("orders.paid.us", { id = "o-3", sku = "b" })
  test.eq(out.outcome, "ack")
  test.eq(out.deliveries, 3)
  test.eq(w:now() - started, 70) -- 10s + 1m, without waiting for them
  test.eq(w:published("orders.fulfilled")[1].payload.attempt, 3)
end)

test("dead-lettered after max_deliver", function()
  test.respond("warehouse.reserve", function() error({ code = 500, message = "warehouse down" }) end)
  local out = w:consume("orders.paid.eu", { id = "o-4", sku = "c" })
  test.eq(out.deliveries, 4)
  test.eq(out.outcome, "term")
  test.eq(out.dead_letter.subject, "orders.dead")
  test.eq(out.dead_letter.payload, { id = "o-4", sku = "c" })
  test.eq(out.dead_letter.headers["Agent-Block-Delivered"], "4")
  test.eq(out.dead_letter.headers["Agent-Block-Error"], "warehouse down")
  test.eq(out.history[1].delay, 10)
  test.eq(out.history[3].delay, 600)
end)

test("out of stock is terminated without a dead letter", function()
  test.respond("warehouse.reserve", function() error({ code = 409, message = "none left" }) end)
  local out = w:send("orders.paid.eu", { id = "o-5", sku = "d" })
  test.eq(out.outcome, "term")
  test.eq(out.reason, "out of stock: d")
  test.eq(out.dead_letter, nil)
end)

test("a body that is not JSON is dead-lettered at once", function()
  local out = w:send("orders.paid.eu", "{oops")
  test.eq(out.outcome, "term")
  test.eq(out.code, 400)
  test.eq(out.dead_letter.data, "{oops")
end)
