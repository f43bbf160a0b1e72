-- validate: check a decoded payload's fields and fail the event with code 400.
--
--   local validate = require("validate")
--   local order = validate.fields(ev.payload, { id = "string", qty = "number" })

local validate = {}

--- Raises { code = 400 } unless `value` is a table whose fields have the given Lua types.
--- Field types ending in "?" are optional. Returns `value` for chaining.
function validate.fields(value, spec)
  if type(value) ~= "table" then
    error({ code = 400, message = "expected a JSON object, got " .. type(value) }, 2)
  end
  for field, expected in pairs(spec) do
    local optional = expected:sub(-1) == "?"
    local wanted = optional and expected:sub(1, -2) or expected
    local actual = type(value[field])
    if not (actual == wanted or (optional and value[field] == nil)) then
      error({ code = 400, message = ("field %q: expected %s, got %s"):format(field, wanted, actual) }, 2)
    end
  end
  return value
end

return validate
