-- orders: request/reply with validation and error codes.
--   agent-block dev lua/examples/orders.lua
--   agent-block request orders.create '{"id":"o-1","items":[{"sku":"a","qty":2}]}' --nats-url <printed URL>
local validate = require("validate")

bus.subscribe("orders.create")

bus.on("orders.create", function(ev)
  -- validate.fields raises { code = 400 } for a missing or mistyped field
  local order = validate.fields(ev.payload, { id = "string", items = "table", note = "string?" })
  if #order.items == 0 then
    error({ code = 422, message = "an order needs at least one item" })
  end
  local total = 0
  for i, item in ipairs(order.items) do
    validate.fields(item, { sku = "string", qty = "number" })
    if item.qty < 1 then
      error({ code = 422, message = ("item %d: qty must be at least 1"):format(i) })
    end
    total = total + item.qty
  end
  return { id = order.id, status = "accepted", units = total }
end)
