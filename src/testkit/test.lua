-- The `test` global of a test file: registration, assertions and the hooks into
-- the fakes. `native` comes from the runner.
local native = ...
local test = {}
local registered = {}

setmetatable(test, {
  __call = function(_, name, fn)
    if type(name) ~= "string" or type(fn) ~= "function" then
      error("test(name, fn): expected a name and a function", 2)
    end
    registered[#registered + 1] = { name = name, fn = fn }
  end,
})

--- A value as one line of text, tables with their keys sorted.
local function show(value, depth)
  depth = depth or 0
  if type(value) == "string" then
    return string.format("%q", value)
  elseif type(value) ~= "table" then
    return tostring(value)
  elseif depth > 4 then
    return "{...}"
  end
  local keys = {}
  for k in pairs(value) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    if type(a) == type(b) and (type(a) == "number" or type(a) == "string") then return a < b end
    return type(a) < type(b)
  end)
  local parts, n = {}, #value
  for _, k in ipairs(keys) do
    if math.type(k) == "integer" and k >= 1 and k <= n then
      parts[#parts + 1] = show(value[k], depth + 1)
    else
      local name = (type(k) == "string" and k:match("^[%a_][%w_]*$")) and k or ("[" .. show(k) .. "]")
      parts[#parts + 1] = name .. " = " .. show(value[k], depth + 1)
    end
  end
  return "{ " .. table.concat(parts, ", ") .. " }"
end
test.show = show

local function equal(a, b, seen)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  seen = seen or {}
  if seen[a] == b then return true end
  seen[a] = b
  for k, v in pairs(a) do
    if not equal(v, b[k], seen) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

--- Fails the running test at the caller's line in the test file.
local function fail(message, fields)
  local failure = fields or {}
  failure.message = message
  failure.where = native.where()
  error(setmetatable(failure, { __tostring = function(f) return f.where .. ": " .. f.message end }), 0)
end
test.fail = function(message) fail(message or "failed") end

--- Deep equality; tables compare by content.
function test.eq(actual, expected, message)
  if not equal(actual, expected) then
    fail(message or "values differ", { expected = show(expected), actual = show(actual) })
  end
end

function test.ne(actual, unexpected, message)
  if equal(actual, unexpected) then
    fail(message or "values are equal", { expected = "not " .. show(unexpected), actual = show(actual) })
  end
end

function test.ok(value, message)
  if not value then
    fail(message or "expected a true value", { expected = "truthy", actual = show(value) })
  end
  return value
end

--- Checks that `text` contains the Lua pattern `pattern`.
function test.matches(text, pattern, message)
  if type(text) ~= "string" or not text:find(pattern) then
    fail(message or "no match", { expected = "text matching " .. show(pattern), actual = show(text) })
  end
end

--- Calls `fn` and returns what it raised; fails if it returned.
function test.raises(fn, pattern)
  local ok, err = pcall(fn)
  if ok then fail("expected an error", { expected = "an error", actual = "no error" }) end
  if pattern then
    local text = type(err) == "table" and tostring(err.message) or tostring(err)
    if not text:find(pattern) then
      fail("error does not match", { expected = "error matching " .. show(pattern), actual = show(err) })
    end
  end
  return err
end

test.worker = native.worker
test.respond = native.respond
test.http = native.http

return test, registered
