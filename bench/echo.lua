-- The agent-block side of the request/reply benchmark (bench/reqreply.rs).
--
-- Answers every request on `bench.echo` with the payload it received. `ev.payload`
-- is the request's JSON decoded into a Lua table and the returned table is encoded
-- back to JSON, so this measures the whole decode -> handler -> encode path that a
-- real handler pays, not just message passing.

bus.subscribe("bench.echo")

bus.on("bench.echo", function(ev)
  return ev.payload
end)
