---@meta agent-block
-- Definitions of the agent-block Lua API for LuaLS and EmmyLua (editor completion,
-- hover and type checks). Nothing here runs: the runtime provides these globals.

---A duration: a humantime string (`"250ms"`, `"1m 30s"`) or a number of seconds.
---@alias agent_block.Duration string|number

---Message headers: name -> value; a repeated header -> list of values.
---@alias agent_block.Headers table<string, string|string[]>

---@class agent_block.EventMeta
---@field subject string
---@field reply string?
---@field stream string? JetStream stream name
---@field consumer string? JetStream consumer name
---@field delivered integer delivery count (1 for core NATS)
---@field stream_seq integer? JetStream stream sequence
---@field pending integer? messages left in the consumer
---@field timestamp number seconds since the epoch (publish time for JetStream, receipt otherwise)
---@field trace_id string? from the `traceparent` header
---@field partition integer? a keyed consumer's partition (from 0)
---@field key string? a keyed consumer's key

---The event passed to a handler.
---@class agent_block.Event
---@field kind string from the subscription's kind template
---@field id string `Nats-Msg-Id`, else `STREAM:seq` for JetStream, else a generated id
---@field subject string
---@field reply string? the reply subject, nil for JetStream and plain publishes
---@field headers agent_block.Headers
---@field data string the raw payload
---@field payload any the payload decoded as JSON on first access; nil when empty
---@field meta agent_block.EventMeta

---What a failed call raises (`nats.request`, `kv.update`, `http.request`) and
---what a handler may raise: `error({ code = 422, message = "..." })`.
---@class agent_block.Error
---@field code integer
---@field message string

---What `bus.reply`, `bus.nak` and `bus.term` return; return it from the handler.
---@class agent_block.Directive

---@alias agent_block.Handler fun(ev: agent_block.Event): any

---@class agent_block.SubscribeOptions
---@field kind string? kind template: `{{subject}}` (default), `{{wildcard(N)}}`
---@field queue (string|false)? queue group (default: the worker's --name); false for none
---@field timeout agent_block.Duration? handler deadline for this subscription

---@class agent_block.CreateStream
---@field subjects string[]

---@class agent_block.ConsumeOptions
---@field stream string
---@field consumer string durable consumer name
---@field subject string? filter subject
---@field kind string? kind template
---@field ack_wait agent_block.Duration?
---@field max_deliver integer? deliveries before the dead letter
---@field backoff agent_block.Duration[]? nak delays by delivery, the last repeating
---@field max_ack_pending integer?
---@field dead_letter string? subject for messages that failed for good
---@field timeout agent_block.Duration? handler deadline for this consumer
---@field create_stream agent_block.CreateStream? create the stream when missing
---@field key string? keyed ordering: a template of the subject's wildcards, e.g. "{{wildcard(1)}}"
---@field partitions integer? how many partitions the keys are spread over (1 to 1024, default 1)

---@class agent_block.ReplyOptions
---@field headers agent_block.Headers?

---@class agent_block.NakOptions
---@field delay agent_block.Duration?

---Handlers, sources and outcomes.
---@class agent_block.bus
bus = {}

---Registers the handler for one kind; registering a kind again replaces it.
---@param kind string
---@param handler agent_block.Handler
function bus.on(kind, handler) end

---The fallback for kinds without a handler (not a tap).
---@param handler agent_block.Handler
function bus.on_any(handler) end

---Ends init; returns at shutdown, so code after it runs as cleanup.
function bus.serve() end

---A core NATS subscription; at the script's top level only.
---@param subject string subject pattern (`*`, `>` wildcards)
---@param opts agent_block.SubscribeOptions?
function bus.subscribe(subject, opts) end

---A JetStream durable pull consumer; at the script's top level only.
---@param opts agent_block.ConsumeOptions
function bus.consume(opts) end

---This VM's 0-based id.
---@return integer
function bus.worker_id() end

---The number of VMs of this process.
---@return integer
function bus.workers() end

---A reply with headers.
---@param value any strings as bytes, anything else as JSON
---@param opts agent_block.ReplyOptions?
---@return agent_block.Directive
function bus.reply(value, opts) end

---Asks for redelivery (core requests get a 503 error).
---@param opts agent_block.NakOptions?
---@return agent_block.Directive
function bus.nak(opts) end

---Gives up on the message without a dead letter (core requests get a 500 error).
---@param reason string?
---@return agent_block.Directive
function bus.term(reason) end

---@class agent_block.PublishOptions
---@field headers agent_block.Headers?

---@class agent_block.RequestOptions
---@field headers agent_block.Headers?
---@field timeout agent_block.Duration? default 5s

---@class agent_block.Reply
---@field data string
---@field payload any the reply decoded as JSON, when it is JSON
---@field headers agent_block.Headers

---Core NATS from handlers; calls carry the current `traceparent`.
---@class agent_block.nats
nats = {}

---Publishes a message (tables as JSON, strings as bytes).
---@param subject string
---@param data any
---@param opts agent_block.PublishOptions?
function nats.publish(subject, data, opts) end

---Sends a request and yields until the reply. Raises `{ code, message }`: 503 no
---responders, 504 timeout, or the responder's `Nats-Service-Error` code.
---@param subject string
---@param data any
---@param opts agent_block.RequestOptions?
---@return agent_block.Reply
function nats.request(subject, data, opts) end

---@class agent_block.BucketOptions
---@field history integer?
---@field ttl agent_block.Duration?

---JetStream key-value: the state shared by the whole pool. Tables are stored as
---JSON and read back as tables; strings as bytes.
---@class agent_block.kv
kv = {}

---@param bucket string
---@param key string
---@return any value nil for a missing key
---@return integer? revision
function kv.get(bucket, key) end

---@param bucket string
---@param key string
---@param value any
---@return integer revision
function kv.put(bucket, key, value) end

---Stores only if the key does not exist (an idempotency guard).
---@param bucket string
---@param key string
---@param value any
---@return integer? revision nil when the key exists
function kv.create(bucket, key, value) end

---Compare-and-set: raises `{ code = 409 }` when `revision` is not the latest.
---@param bucket string
---@param key string
---@param value any
---@param revision integer
---@return integer revision
function kv.update(bucket, key, value, revision) end

---@param bucket string
---@param key string
function kv.delete(bucket, key) end

---@param bucket string
---@param prefix string?
---@return string[]
function kv.keys(bucket, prefix) end

---Creates the bucket when missing (safe from every VM).
---@param name string
---@param opts agent_block.BucketOptions?
function kv.bucket(name, opts) end

---@class agent_block.HttpOptions
---@field method string? default GET
---@field headers agent_block.Headers?
---@field body any a table is sent as JSON
---@field timeout agent_block.Duration?

---@class agent_block.HttpResponse
---@field status integer
---@field headers agent_block.Headers
---@field body string
---@field json any the body decoded as JSON on first access

---Outgoing HTTP; transport failures raise `{ code = 502|504 }`, an HTTP error
---status is a normal return.
---@class agent_block.http
http = {}

---@param url string
---@param opts agent_block.HttpOptions?
---@return agent_block.HttpResponse
function http.request(url, opts) end

---@param url string
---@param opts agent_block.HttpOptions?
---@return agent_block.HttpResponse
function http.get(url, opts) end

---@param url string
---@param body any
---@param opts agent_block.HttpOptions?
---@return agent_block.HttpResponse
function http.post(url, body, opts) end

---@class agent_block.ExecResult
---@field affected integer
---@field last_id integer?

---@class agent_block.SqlConnection
local SqlConnection = {}

---@param statement string
---@param params any[]?
---@return table[] rows
function SqlConnection.query(statement, params) end

---@param statement string
---@param params any[]?
---@return agent_block.ExecResult
function SqlConnection.exec(statement, params) end

---SQL (PostgreSQL, SQLite) from `--sql-url` and `--sql NAME=URL`; parameters are bound.
---@class agent_block.sql: agent_block.SqlConnection
---@field null any NULL in rows
sql = {}

---Commits when `fn` returns, rolls back when it raises, times out or is cancelled.
---@param fn fun(tx: agent_block.SqlConnection): any
---@return any
function sql.transaction(fn) end

---A named database (`--sql NAME=URL`).
---@param name string
---@return agent_block.sql
function sql.db(name) end

---@class agent_block.ShOptions
---@field timeout agent_block.Duration?
---@field cwd string?
---@field env table<string, string>?
---@field stdin string?

---@class agent_block.ShResult
---@field ok boolean
---@field code integer?
---@field stdout string
---@field stderr string

---Processes; only with --unsafe-lua.
---@class agent_block.sh
sh = {}

---@param command string
---@param opts agent_block.ShOptions?
---@return agent_block.ShResult
function sh.exec(command, opts) end

---Structured logs with the event's kind, id and trace id.
---@class agent_block.log
log = {}

---@param message string
---@param fields table?
function log.debug(message, fields) end

---@param message string
---@param fields table?
function log.info(message, fields) end

---@param message string
---@param fields table?
function log.warn(message, fields) end

---@param message string
---@param fields table?
function log.error(message, fields) end

---@class agent_block.json
---@field null any JSON null
json = {}

---@param value any
---@return string
function json.encode(value) end

---@param text string
---@return any
function json.decode(text) end

---@class agent_block.time
time = {}

---Seconds since the epoch.
---@return number
function time.now() end

---Yields for `duration` (`time.sleep(0)` lets the VM run its other work).
---@param duration agent_block.Duration
function time.sleep(duration) end

---@class agent_block.env
env = {}

---An environment variable, or nil.
---@param name string
---@return string?
function env.get(name) end
