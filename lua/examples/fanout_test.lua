local w = test.worker("fanout.lua")

test("publishes to every downstream subject", function()
  local out = w:send("signup", { user = "ada", email = "ada@example.com" })
  test.eq(out.payload, { ok = true })
  test.eq(w:published("email.welcome")[1].payload, { to = "ada@example.com", user = "ada" })
  test.eq(w:published("crm.contact")[1].payload.name, "ada")
  local audit = w:published("audit.>")[1]
  test.eq(audit.headers["Audit-Source"], "fanout")
  test.eq(#w:published(), 3)
end)

test("publishes are recorded per test", function()
  test.eq(#w:published(), 0)
end)
