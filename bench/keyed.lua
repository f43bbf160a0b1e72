-- The scaling benchmark's handler: decode the payload, ack. Keyed by the
-- subject's last token when BENCH_PARTITIONS is above 0.
local partitions = tonumber(env.get("BENCH_PARTITIONS") or "0")
local consumer = {
  stream = env.get("BENCH_STREAM") or "FLAT",
  consumer = env.get("BENCH_CONSUMER") or "agent",
  subject = env.get("BENCH_SUBJECT") or "flat.*",
  kind = "job",
}
if partitions > 0 then
  consumer.key = "{{wildcard(1)}}"
  consumer.partitions = partitions
end
bus.consume(consumer)

bus.on("job", function(ev)
  local _ = ev.payload
  return true
end)
