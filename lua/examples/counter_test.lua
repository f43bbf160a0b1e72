local w = test.worker("counter.lua", { kv = { counters = { about = "41" } } })

local function visit(page, id)
  return w:send("visits." .. page, nil, { headers = { ["Nats-Msg-Id"] = id } }).payload
end

test("counts visits per page", function()
  test.eq(visit("home", "a").count, 1)
  test.eq(visit("home", "b").count, 2)
  test.eq(visit("about", "c").count, 42)
  test.eq(w:kv("counters", "home"), "2")
end)

test("a repeated message id counts once", function()
  test.eq(visit("pricing", "same").count, 1)
  local again = visit("pricing", "same")
  test.eq(again.duplicate, true)
  test.eq(again.count, 1)
end)

test("revisions count up per bucket", function()
  local _, before = w:kv("counters", "home")
  visit("home", "d")
  local value, after = w:kv("counters", "home")
  test.eq(value, "3")
  test.ok(after > before)
end)
