-- Bridge benchmark: each handler makes `n` calls one after another and reports
-- how long they took, so NATS is crossed once per batch, not per call.
bus.subscribe("bench.http")
bus.subscribe("bench.sql")

bus.on("bench.http", function(ev)
  local url, n = ev.payload.url, ev.payload.n
  local started = time.now()
  for _ = 1, n do
    local response = http.get(url)
    if response.status ~= 200 then error("status " .. response.status) end
  end
  return { seconds = time.now() - started }
end)

bus.on("bench.sql", function(ev)
  local n = ev.payload.n
  local started = time.now()
  for i = 1, n do
    local rows = sql.query("select $1::int8 as n", { i })
    if rows[1].n ~= i then error("wrong row") end
  end
  return { seconds = time.now() - started }
end)
