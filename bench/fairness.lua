-- The fairness benchmark's workload (bench/fairness.rs): `cpu` computes without
-- ever waiting; `probe` sleeps and reports how late after its sleep it was resumed,
-- which is how long it waited for the VM once it was ready.

bus.subscribe("fair.cpu", { kind = "cpu" })
bus.subscribe("fair.probe", { kind = "probe" })

bus.on("cpu", function(ev)
  local started = time.now()
  local sum = 0
  for i = 1, ev.payload.n do
    sum = sum + (i % 7) * 3
  end
  return { seconds = time.now() - started, sum = sum }
end)

bus.on("probe", function(ev)
  local sleep = ev.payload.sleep
  local started = time.now()
  time.sleep(sleep)
  return { late = time.now() - started - sleep }
end)
