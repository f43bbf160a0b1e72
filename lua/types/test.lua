---@meta agent-block-test
-- The `test` global of `agent-block test` files (`*_test.lua`).

---@class agent_block.test.WorkerOptions
---@field env table<string, string>? what env.get sees
---@field kv table<string, table<string, any>>? buckets to create, with entries
---@field timeout agent_block.Duration? handler deadline
---@field now number? the virtual clock's start, seconds since the epoch

---@class agent_block.test.SendOptions
---@field headers agent_block.Headers?
---@field delivered integer? JetStream delivery count (default 1)

---@class agent_block.test.Message
---@field subject string
---@field data string
---@field payload any
---@field headers agent_block.Headers

---How an event was settled. Fields that do not apply to the outcome are nil.
---@class agent_block.test.Outcome
---@field outcome "ack"|"error"|"nak"|"term"
---@field kind string
---@field data string the reply
---@field payload any the reply decoded as JSON
---@field headers agent_block.Headers?
---@field code integer error code
---@field message string error message
---@field delay number nak delay in seconds
---@field reason string term reason
---@field dead_letter agent_block.test.Message the dead letter published
---@field deliveries integer deliveries made by `w:consume`
---@field history agent_block.test.Outcome[] every outcome of `w:consume`

---One delivery made by `w:consume_all`: its outcome, and which message it was.
---@class agent_block.test.Delivery: agent_block.test.Outcome
---@field subject string
---@field index integer the message's position in the list given to `w:consume_all`
---@field delivered integer the message's delivery count (`ev.meta.delivered`)

---A message for `w:consume_all`: `{ subject, data?, opts? }`, as `w:consume` takes them.
---@alias agent_block.test.QueuedMessage [string, any?, agent_block.test.SendOptions?]

---A worker under test.
---@class agent_block.test.Worker
local Worker = {}

---Sends one event and returns how it was settled.
---@param subject string
---@param data any?
---@param opts agent_block.test.SendOptions?
---@return agent_block.test.Outcome
function Worker:send(subject, data, opts) end

---Delivers a JetStream message until the consumer stops redelivering it.
---@param subject string
---@param data any?
---@param opts agent_block.test.SendOptions?
---@return agent_block.test.Outcome
function Worker:consume(subject, data, opts) end

---Consumes the messages together, as their consumers would, on the virtual clock:
---each is delivered once in list order, a nak'ed one again after its delay (the
---clock moves to the earliest redelivery due) until it is acked, terminated,
---dead-lettered or `max_deliver` is reached. A keyed consumer's message waits
---until every earlier message of its partition is finished: its key's, and
---those of the keys sharing the partition, as the partition's one-in-flight
---consumer does. Every delivery's outcome, in the order they happened.
---@param messages agent_block.test.QueuedMessage[]
---@return agent_block.test.Delivery[]
function Worker:consume_all(messages) end

---Messages published so far in this test, filtered by a subject pattern.
---@param pattern string?
---@return agent_block.test.Message[]
function Worker:published(pattern) end

---@param bucket string
---@param key string
---@return any value
---@return integer? revision
function Worker:kv(bucket, key) end

---@return number
function Worker:now() end

---@param by agent_block.Duration
function Worker:advance(by) end

---@class agent_block.test.Request
---@field subject string
---@field data string
---@field payload any
---@field headers agent_block.Headers

---@class agent_block.test.HttpRequest
---@field method string
---@field url string
---@field headers agent_block.Headers
---@field body string
---@field json any

---@class agent_block.test
---@overload fun(name: string, fn: fun())
test = {}

---@param actual any
---@param expected any
---@param message string?
function test.eq(actual, expected, message) end

---@param actual any
---@param unexpected any
---@param message string?
function test.ne(actual, unexpected, message) end

---@generic T
---@param value T
---@param message string?
---@return T
function test.ok(value, message) end

---@param text string?
---@param pattern string
---@param message string?
function test.matches(text, pattern, message) end

---@param fn fun()
---@param pattern string?
---@return any error
function test.raises(fn, pattern) end

---@param message string?
function test.fail(message) end

---@param value any
---@return string
function test.show(value) end

---Loads `script` (next to the test file) into a worker with fake bridges.
---@param script string
---@param opts agent_block.test.WorkerOptions?
---@return agent_block.test.Worker
function test.worker(script, opts) end

---Answers `nats.request` on `subject`.
---@param subject string
---@param answer (fun(req: agent_block.test.Request): any, agent_block.Headers?)|any
function test.respond(subject, answer) end

---Answers `http.request` for `"[METHOD ]url"` (`*` matches anything).
---@param pattern string
---@param answer (fun(req: agent_block.test.HttpRequest): any)|any
function test.http(pattern, answer) end
