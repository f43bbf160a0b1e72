-- kinds: one subscription over a subject hierarchy, handlers by kind.
--   agent-block dev lua/examples/kinds.lua
--   agent-block request shop.eu.cart.add '{"sku":"a"}' --nats-url <printed URL>
-- `shop.<region>.<entity>.<action>`: the kind drops the region, so one handler
-- serves every region; the region is still in ev.subject.
bus.subscribe("shop.*.>", { kind = "{{wildcard(2)}}" })

local carts = {}

local function region(ev)
  return ev.subject:match("^shop%.([^.]+)%.")
end

bus.on("cart.add", function(ev)
  local key = region(ev) .. ":" .. (ev.headers["User"] or "anonymous")
  carts[key] = (carts[key] or 0) + 1
  return { region = region(ev), items = carts[key] }
end)

bus.on("cart.clear", function(ev)
  carts[region(ev) .. ":" .. (ev.headers["User"] or "anonymous")] = nil
  return { cleared = true }
end)

-- Anything else under shop.*.> lands here instead of failing with 404.
bus.on_any(function(ev)
  error({ code = 501, message = "not implemented: " .. ev.kind })
end)
