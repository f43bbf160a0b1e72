local w = test.worker("webhook.lua", { env = { WEBHOOK_URL = "https://hooks.test/orders" } })

test("forwards the order and reports the endpoint's status", function()
  test.http("POST https://hooks.test/orders", function(req)
    test.eq(req.json.id, 42)
    return { status = 202 }
  end)
  local out = w:send("orders.created", { id = 42 })
  test.eq(out.payload, { delivered = true, status = 202 })
end)

test("an endpoint that fails becomes a 502", function()
  test.http("POST https://hooks.test/orders", function() return { status = 500 } end)
  local out = w:send("orders.created", { id = 43 })
  test.eq(out.code, 502)
  test.matches(out.message, "webhook answered 500")
end)
