local w = test.worker("ordering.lua")

--- Each delivery as "order:step#delivered outcome", in the order they happened.
local function trace(history)
  local lines = {}
  for _, out in ipairs(history) do
    local step = ({ "a1", "a2", "b1" })[out.index]
    lines[#lines + 1] = step .. "#" .. out.delivered .. " " .. out.outcome
  end
  return lines
end

test("a failed message holds back its key, not the others", function()
  local started = w:now()
  local history = w:consume_all({
    { "ord.a", { step = "created", fail = true } },
    { "ord.a", { step = "paid" } },
    { "ord.b", { step = "created" } },
  })
  test.eq(trace(history), { "a1#1 nak", "b1#1 ack", "a1#2 ack", "a2#1 ack" })
  test.eq(history[1].delay, 5)
  test.eq(w:now() - started, 5) -- a's retry waited for its backoff on the virtual clock
  test.eq(history[4].payload, { key = "a", partition = 4, steps = { "created", "paid" } })
  test.eq(history[2].payload, { key = "b", partition = 1, steps = { "created" } })
end)

test("each message carries its key and partition", function()
  local out = w:consume("ord.g", { step = "created" })
  test.eq(out.payload.key, "g")
  test.eq(out.payload.partition, 0)
end)
