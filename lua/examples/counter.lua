-- counter: KV as the pool's shared state. A page-view counter updated with
-- compare-and-set, and an idempotency guard so a message counts once.
--   agent-block dev lua/examples/counter.lua
--   agent-block request visits.home '' -H Nats-Msg-Id:v-1 --nats-url <printed URL>
kv.bucket("counters")
kv.bucket("seen", { ttl = "1h" })

bus.subscribe("visits.*", { kind = "visit" })

local function increment(page)
  -- Another worker may update between our get and update: update raises
  -- { code = 409 } then, and we read again.
  for _ = 1, 10 do
    local value, revision = kv.get("counters", page)
    local count = (tonumber(value) or 0) + 1
    local ok, err = pcall(function()
      if revision then
        return kv.update("counters", page, tostring(count), revision)
      end
      return kv.create("counters", page, tostring(count)) or error({ code = 409 })
    end)
    if ok then return count end
    if type(err) ~= "table" or err.code ~= 409 then error(err, 0) end
  end
  error({ code = 503, message = "counter busy; try again" })
end

bus.on("visit", function(ev)
  local page = ev.subject:match("^visits%.(.+)$") or ev.subject
  -- kv.create returns nil when the key exists: this message id was counted.
  if not kv.create("seen", ev.id, "1") then
    return { page = page, count = tonumber((kv.get("counters", page))), duplicate = true }
  end
  return { page = page, count = increment(page) }
end)
