-- The JetStream benchmark's handler: decode the payload, ack.
bus.consume({ stream = "BENCH", consumer = env.get("BENCH_CONSUMER") or "agent", subject = "bench.js" })

bus.on("bench.js", function(ev)
  local _ = ev.payload
  return true
end)
