-- The CPU benchmark's workload (bench/cpu.rs): one CPU-bound function, run both as
-- an agent-block handler (under `agent-block replay`, deadline armed) and as a
-- plain script by the reference interpreter (`lua5.4 cpu.lua N`).
--
-- It times only the loop, with os.clock (process CPU time), so start-up costs of
-- either runner do not count.

local function work(n)
  local sum = 0
  for i = 1, n do
    sum = sum + (i % 7) * 3
  end
  return sum
end

local function timed(n)
  local started = os.clock()
  local sum = work(n)
  return os.clock() - started, sum
end

if bus then
  bus.on("cpu", function(ev)
    local seconds, sum = timed(ev.payload.n)
    return { seconds = seconds, sum = sum }
  end)
else
  local seconds, sum = timed(tonumber(arg[1]))
  print(string.format("%.6f %d", seconds, sum))
end
