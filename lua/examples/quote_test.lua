local w = test.worker("quote.lua")

test("multiplies the unit price", function()
  test.respond("pricing.get", function(req)
    test.eq(req.payload.sku, "a")
    return { unit = 2.5 }
  end)
  local out = w:send("quote", { sku = "a", qty = 4 })
  test.eq(out.payload, { sku = "a", qty = 4, total = 10 })
end)

test("an unknown sku from pricing is a 404", function()
  test.respond("pricing.get", function() error({ code = 404, message = "no such sku" }) end)
  local out = w:send("quote", { sku = "zz", qty = 1 })
  test.eq(out.code, 404)
  test.eq(out.message, "unknown sku zz")
end)

test("no pricing service at all is a 502", function()
  -- no responder: nats.request raises 503, as it would in production
  local out = w:send("quote", { sku = "a", qty = 1 })
  test.eq(out.code, 502)
  test.matches(out.message, "no responders")
end)
