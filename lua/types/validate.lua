---@meta
-- The embedded `validate` library: `local validate = require("validate")`.

---@class agent_block.validate
local validate = {}

---Raises `{ code = 400 }` unless `value` is a table whose fields have the given
---Lua types (`"string"`, `"number"`, `"table"`, ...; a trailing `?` makes a field
---optional). Returns `value`.
---@generic T
---@param value T
---@param spec table<string, string>
---@return T
function validate.fields(value, spec) end

return validate
