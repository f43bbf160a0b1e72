//! The event table handed to handlers. `kind`, `id`, `subject`, `reply` and `data`
//! are plain fields; `payload`, `headers` and `meta` are built on first access and
//! cached in the table, so a handler pays only for what it reads.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use std::ffi::c_char;

use mlua::{Function, Lua, LuaSerdeExt, Table, UserData, Value, ffi};

use crate::event::{Event, StreamMeta, span_id_of, trace_id_of};
use crate::lua_api::json;
use crate::lua_api::packed_fields::{Field, PackedFields};

/// A body that the handler read as `ev.payload` is not JSON: the event fails with 400.
#[derive(Debug, thiserror::Error)]
#[error("payload is not valid JSON: {0}")]
pub struct PayloadError(pub String);

/// Key of the hidden per-event data the lazy fields are built from: the
/// [`EventExtra`] userdata of an event with headers or kept stream metadata,
/// else a string of [`PackedFields`].
const EXTRA: &str = "\0event";
/// The keys an event table gets, kept as Lua strings in the metatable's array
/// part (at these positions) so building a table does not hash them again.
const KEYS: [&str; 6] = ["kind", "id", "subject", "reply", "data", EXTRA];
/// Slots of the metatable's array part: the keys `kind`, `id`, `subject`,
/// `reply`, `data` and [`EXTRA`] (from [`KEYS`]), the metatable decoded arrays
/// get, [`lazy_field`] as a Lua function, and the last kind and subject pushed
/// (most events of a VM repeat them, and a cached string needs no hashing).
const KIND_KEY_SLOT: ffi::lua_Integer = 1;
const ID_KEY_SLOT: ffi::lua_Integer = 2;
const SUBJECT_KEY_SLOT: ffi::lua_Integer = 3;
const REPLY_KEY_SLOT: ffi::lua_Integer = 4;
const DATA_SLOT: ffi::lua_Integer = 5;
const EXTRA_SLOT: ffi::lua_Integer = 6;
const ARRAY_METATABLE_SLOT: ffi::lua_Integer = 9;
const LAZY_FIELD_SLOT: ffi::lua_Integer = 10;
const KIND_CACHE_SLOT: ffi::lua_Integer = 11;
const SUBJECT_CACHE_SLOT: ffi::lua_Integer = 12;
/// Packed fields up to this length are written on the C stack; longer ones
/// (long reply subjects or ids) in a scratch Lua userdata. A body is packed
/// only when the whole still fits here; a longer one is the `data` field, so
/// it is copied once.
const PACKED_ON_STACK: usize = 512;

struct EventExtra {
    headers: Option<HeaderMap>,
    received: SystemTime,
    trace_id: Option<String>,
    span_id: Option<String>,
    stream: Option<StreamMeta>,
}

impl UserData for EventExtra {}

/// Builds event tables; holds the metatable shared by all of them on one VM.
///
/// A handler's table is built inside its own coroutine, by [`EventTables::builder`]
/// as the runner's first step: that resume is already a protected call, so the
/// table needs no protected call of its own, and it reaches the handler without
/// a registry reference. The builder reads the event from a slot that
/// [`EventTables::arm`] fills only while the coroutine's first resume runs.
pub struct EventTables {
    /// Holds the metatable as an upvalue.
    builder: Function,
    /// The builder's upvalue: a Lua userdata block holding one pointer, kept
    /// alive (and at this address, as Lua never moves objects) by `builder`.
    slot: *mut *const PendingEvent<'static>,
}

/// What the builder reads an event's table from.
pub struct PendingEvent<'a> {
    event: &'a Event,
    /// The `traceparent` of the handler's span, when spans are exported.
    span: Option<&'a str>,
}

/// Clears the builder's slot when dropped.
pub struct Armed<'a> {
    tables: &'a EventTables,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        // SAFETY: the slot lives as long as `builder`, which `tables` holds.
        unsafe { *self.tables.slot = std::ptr::null() };
    }
}

impl EventTables {
    pub fn new(lua: &Lua) -> mlua::Result<Self> {
        let metatable = lua.create_table()?;
        // Kept as a Lua string, so reading the body does not hash its key again.
        let data_key = lua.create_string("data")?;
        // SAFETY: `event_index` keeps the invariant stated on it.
        metatable.set("__index", unsafe { lua.create_c_function(event_index)? })?;
        for (index, key) in KEYS.into_iter().enumerate() {
            metatable.raw_set(index + 1, key)?;
        }
        metatable.raw_set(ARRAY_METATABLE_SLOT, lua.array_metatable())?;
        metatable.raw_set(
            LAZY_FIELD_SLOT,
            lua.create_function(move |lua, (table, key): (Table, Value)| lazy_field(lua, &data_key, table, key))?,
        )?;
        // Filled now, so replacing a cached string never grows the array part.
        for cache in [KIND_CACHE_SLOT, SUBJECT_CACHE_SLOT] {
            metatable.raw_set(cache, "")?;
        }
        let mut slot: *mut *const PendingEvent<'static> = std::ptr::null_mut();
        // SAFETY: pushes the slot (a plain block, no metatable, written before
        // anything can raise) above the metatable, then one closure over both,
        // within the `LUA_MINSTACK` slots every C frame has.
        let builder = unsafe {
            lua.exec_raw::<Function>(&metatable, |state| {
                let block = ffi::lua_newuserdatauv(state, std::mem::size_of::<*const PendingEvent>(), 0);
                slot = block.cast();
                *slot = std::ptr::null();
                ffi::lua_pushcclosure(state, build_event, 2);
            })?
        };
        Ok(EventTables { builder, slot })
    }

    /// `build(extra)`: the event table of the event armed now (see
    /// [`EventTables::arm`]); raises when none is.
    pub fn builder(&self) -> &Function {
        &self.builder
    }

    /// The argument the builder takes with `pending`: the userdata that keeps an
    /// event's headers and stream position, or nil when [`PackedFields`] hold
    /// all the lazy fields need (messages without headers, most of them).
    pub fn extra(&self, lua: &Lua, pending: &PendingEvent) -> mlua::Result<Value> {
        let event = pending.event;
        let full = event.stream.as_ref().is_some_and(|stream| stream.ack_subject.is_none() || stream.keyed.is_some());
        if event.headers.is_none() && !full {
            return Ok(Value::Nil);
        }
        let span = pending.span;
        Ok(Value::UserData(lua.create_userdata(EventExtra {
            headers: event.headers.clone(),
            received: event.received,
            trace_id: span.and_then(trace_id_of).or_else(|| event.trace_id()).map(str::to_string),
            span_id: span.and_then(span_id_of).map(str::to_string),
            stream: event.stream.as_deref().cloned(),
        })?))
    }

    /// Lets the builder build `pending`'s table until the guard is dropped. Arm
    /// only around a synchronous step that calls the builder (the first resume
    /// of the handler's coroutine), so the slot never outlives `pending`.
    pub fn arm<'a>(&'a self, pending: &'a PendingEvent<'a>) -> Armed<'a> {
        // SAFETY: the slot lives as long as `builder`; the guard clears it
        // before `pending` can go away.
        unsafe { *self.slot = (pending as *const PendingEvent<'a>).cast() };
        Armed { tables: self }
    }

    /// Builds `event`'s table outside a handler (tests, tools).
    pub fn build(&self, lua: &Lua, event: &Event, span: Option<&str>) -> mlua::Result<Table> {
        let pending = PendingEvent::new(event, span);
        let extra = self.extra(lua, &pending)?;
        let _armed = self.arm(&pending);
        self.builder.call(extra)
    }
}

impl<'a> PendingEvent<'a> {
    pub fn new(event: &'a Event, span: Option<&'a str>) -> Self {
        PendingEvent { event, span }
    }
}

/// The builder: pushes the table of the armed event, with the metatable and
/// the hidden field, and disarms the slot.
///
/// Invariant: upvalue 1 is the metatable, upvalue 2 the slot (see
/// [`EventTables::new`]); called with at most one argument, the userdata of
/// [`EventTables::extra`] or nil, and `LUA_MINSTACK` (20) free slots, of which
/// it uses 6. The slot is cleared before anything can raise, and an error
/// (out of memory) unwinds a frame that holds only references and plain
/// values (the packed bytes are written into a plain array or a Lua
/// userdata). A call with nothing armed (a script reaching it through
/// `debug`) raises.
unsafe extern "C-unwind" fn build_event(state: *mut ffi::lua_State) -> std::ffi::c_int {
    unsafe {
        let slot = ffi::lua_touserdata(state, ffi::lua_upvalueindex(2)) as *mut *const PendingEvent<'static>;
        let pending = *slot;
        *slot = std::ptr::null();
        if pending.is_null() {
            ffi::lua_pushstring(state, c"no event to build a table for".as_ptr());
            ffi::lua_error(state);
        }
        let PendingEvent { event, span } = *pending;
        let metatable = ffi::lua_upvalueindex(1);
        ffi::lua_settop(state, 1);
        let packed = ffi::lua_isnil(state, 1) != 0;
        // Room for the fields and for those a handler reads lazily (cached
        // in the table), so reading `ev.payload` does not rehash it.
        ffi::lua_createtable(state, 0, 8);
        let field = |key_slot: ffi::lua_Integer, push: &dyn Fn()| {
            ffi::lua_rawgeti(state, metatable, key_slot);
            push();
            ffi::lua_rawset(state, 2);
        };
        field(KIND_KEY_SLOT, &|| push_cached(state, metatable, KIND_CACHE_SLOT, event.kind.as_bytes()));
        field(SUBJECT_KEY_SLOT, &|| push_cached(state, metatable, SUBJECT_CACHE_SLOT, event.subject.as_bytes()));
        if !packed {
            field(DATA_SLOT, &|| push_bytes(state, &event.data));
            field(ID_KEY_SLOT, &|| push_bytes(state, event.id.as_bytes()));
            if let Some(reply) = &event.reply {
                field(REPLY_KEY_SLOT, &|| push_bytes(state, reply.as_bytes()));
            }
            field(EXTRA_SLOT, &|| ffi::lua_pushvalue(state, 1));
        } else {
            let mut fields = PackedFields {
                received: seconds_since_epoch(event.received),
                id: Some(event.id.as_bytes()),
                reply: event.reply.as_ref().map(|reply| reply.as_bytes()),
                span: span.map(str::as_bytes),
                ack_subject: event.stream.as_ref().and_then(|stream| stream.ack_subject.as_ref()).map(|s| s.as_bytes()),
                data: Some(&event.data),
            };
            if fields.packed_len().is_none_or(|len| len > PACKED_ON_STACK) {
                fields.data = None;
                field(DATA_SLOT, &|| push_bytes(state, &event.data));
            }
            let Some(len) = fields.packed_len() else {
                ffi::lua_pushstring(state, c"an event field is too long".as_ptr());
                ffi::lua_error(state);
            };
            field(EXTRA_SLOT, &|| push_packed(state, &fields, len));
        }
        ffi::lua_pushvalue(state, metatable);
        ffi::lua_setmetatable(state, 2);
        1
    }
}

/// Pushes `bytes` as a Lua string, reusing the string cached in the
/// metatable's array part at `cache` when it holds these bytes, else caching
/// the new one there (the slot exists, so the store does not allocate).
///
/// # Safety
/// As [`build_event`], whose frame it shares; uses 2 slots.
unsafe fn push_cached(state: *mut ffi::lua_State, metatable: std::ffi::c_int, cache: ffi::lua_Integer, bytes: &[u8]) {
    unsafe {
        if ffi::lua_rawgeti(state, metatable, cache) == ffi::LUA_TSTRING {
            let mut len = 0;
            let cached = ffi::lua_tolstring(state, -1, &mut len);
            if std::slice::from_raw_parts(cached as *const u8, len) == bytes {
                return;
            }
        }
        ffi::lua_pop(state, 1);
        push_bytes(state, bytes);
        ffi::lua_pushvalue(state, -1);
        ffi::lua_rawseti(state, metatable, cache);
    }
}

/// Pushes `fields` packed into one Lua string of `len` bytes.
///
/// # Safety
/// As [`build_event`], whose frame it shares; uses 2 slots.
unsafe fn push_packed(state: *mut ffi::lua_State, fields: &PackedFields, len: usize) {
    unsafe {
        if len <= PACKED_ON_STACK {
            let mut buffer = [0u8; PACKED_ON_STACK];
            fields.write(&mut buffer[..len]);
            push_bytes(state, &buffer[..len]);
        } else {
            let scratch = ffi::lua_newuserdatauv(state, len, 0) as *mut u8;
            fields.write(std::slice::from_raw_parts_mut(scratch, len));
            push_bytes(state, std::slice::from_raw_parts(scratch, len));
            ffi::lua_remove(state, -2);
        }
    }
}

/// `__index` of event tables. `ev.payload`, read by nearly every handler, is
/// decoded here on the handler's own stack, without a Rust callback, and so
/// are `ev.id`, `ev.reply` and `ev.data` of a table with [`PackedFields`]; `headers`,
/// `meta`, and a body that is not JSON (whose error the handler gets) go to
/// [`lazy_field`]; other keys are nil.
///
/// Invariant: Lua calls it with two arguments and `LUA_MINSTACK` (20) free
/// slots, of which it uses at most 8. It checks each value it reads (a script
/// may call it with anything). Every call that can raise an error (`lua_call`,
/// `lua_rawset`) runs while no local with a destructor is alive, so an error
/// unwinding through this frame skips none; the parsed document, which has
/// one, is pushed inside its own protected call and dropped before caching.
unsafe extern "C-unwind" fn event_index(state: *mut ffi::lua_State) -> std::ffi::c_int {
    unsafe {
        if ffi::lua_type(state, 1) != ffi::LUA_TTABLE || ffi::lua_type(state, 2) != ffi::LUA_TSTRING {
            return 0;
        }
        let mut len = 0;
        let key = ffi::lua_tolstring(state, 2, &mut len);
        match std::slice::from_raw_parts(key as *const u8, len) {
            b"payload" => {
                if push_payload(state) {
                    return 1;
                }
            }
            b"id" => return push_unpacked(state, Field::Id),
            b"reply" => return push_unpacked(state, Field::Reply),
            b"data" => return push_unpacked(state, Field::Data),
            b"headers" | b"meta" => {}
            _ => return 0,
        }
        ffi::lua_settop(state, 2);
        if ffi::lua_getmetatable(state, 1) == 0 || ffi::lua_rawgeti(state, 3, LAZY_FIELD_SLOT) != ffi::LUA_TFUNCTION {
            return 0;
        }
        ffi::lua_pushvalue(state, 1);
        ffi::lua_pushvalue(state, 2);
        ffi::lua_call(state, 2, 1);
        1
    }
}

/// Pushes `ev.payload` decoded from `ev.data` (nil for an empty body) and
/// caches it in the table at index 1, whose key is at index 2. Returns false,
/// the stack as it was, when the body is not a string or not JSON.
///
/// # Safety
/// As [`event_index`], whose frame it shares.
unsafe fn push_payload(state: *mut ffi::lua_State) -> bool {
    unsafe {
        // 3: the metatable, 4: the body or the packed fields holding it, 5: the
        // array metatable.
        let body = if ffi::lua_getmetatable(state, 1) == 0 || ffi::lua_rawgeti(state, 3, DATA_SLOT) != ffi::LUA_TSTRING
        {
            None
        } else if ffi::lua_rawget(state, 1) == ffi::LUA_TSTRING {
            Some(lua_bytes(state, 4))
        } else {
            ffi::lua_settop(state, 3);
            let packed = ffi::lua_rawgeti(state, 3, EXTRA_SLOT) == ffi::LUA_TSTRING
                && ffi::lua_rawget(state, 1) == ffi::LUA_TSTRING;
            packed.then(|| PackedFields::read(lua_bytes(state, 4)).and_then(|fields| fields.data)).flatten()
        };
        let Some(body) = body.filter(|_| ffi::lua_rawgeti(state, 3, ARRAY_METATABLE_SLOT) == ffi::LUA_TTABLE) else {
            ffi::lua_settop(state, 2);
            return false;
        };
        if body.is_empty() {
            ffi::lua_pushnil(state);
            return true;
        }
        // The body stays on the stack (index 4) while the document borrows it.
        if !json::push_protected(state, body, 5) {
            ffi::lua_settop(state, 2);
            return false;
        }
        // 6: the value, cached as a plain field.
        ffi::lua_pushvalue(state, 2);
        ffi::lua_pushvalue(state, 6);
        ffi::lua_rawset(state, 1);
        true
    }
}

/// Pushes `ev.id`, `ev.reply` or `ev.data` read from the table's
/// [`PackedFields`] (nil when absent) and caches it in the table at index 1, whose key is at index
/// 2. Returns the number of results: 0 for a table without packed fields.
///
/// # Safety
/// As [`event_index`], whose frame it shares; uses 5 slots.
unsafe fn push_unpacked(state: *mut ffi::lua_State, field: Field) -> std::ffi::c_int {
    unsafe {
        // 3: the metatable, 4: the hidden field.
        if ffi::lua_getmetatable(state, 1) == 0
            || ffi::lua_rawgeti(state, 3, EXTRA_SLOT) != ffi::LUA_TSTRING
            || ffi::lua_rawget(state, 1) != ffi::LUA_TSTRING
        {
            return 0;
        }
        let mut len = 0;
        let packed = ffi::lua_tolstring(state, 4, &mut len);
        let Some(value) = PackedFields::read(std::slice::from_raw_parts(packed as *const u8, len)) else {
            return 0;
        };
        let Some(value) = value.get(field) else {
            ffi::lua_pushnil(state);
            return 1;
        };
        // 5: the value, cached as a plain field.
        push_bytes(state, value);
        ffi::lua_pushvalue(state, 2);
        ffi::lua_pushvalue(state, 5);
        ffi::lua_rawset(state, 1);
        1
    }
}

fn lazy_field(lua: &Lua, data_key: &mlua::LuaString, table: Table, key: Value) -> mlua::Result<Value> {
    let Value::String(key) = key else { return Ok(Value::Nil) };
    let value = match &*key.as_bytes() {
        b"payload" => payload(lua, &table, data_key)?,
        b"headers" => Value::Table(match extra(&table)? {
            Extra::Full(extra) => headers_table(lua, extra.headers.as_ref())?,
            Extra::Packed(_) => lua.create_table()?,
        }),
        b"meta" => Value::Table(meta(lua, &table)?),
        _ => return Ok(Value::Nil),
    };
    table.raw_set(key, &value)?;
    Ok(value)
}

/// The bytes of the string at `index`, borrowed while it stays on the stack.
///
/// # Safety
/// The value at `index` is a string.
unsafe fn lua_bytes<'a>(state: *mut ffi::lua_State, index: std::ffi::c_int) -> &'a [u8] {
    unsafe {
        let mut len = 0;
        let bytes = ffi::lua_tolstring(state, index, &mut len);
        std::slice::from_raw_parts(bytes as *const u8, len)
    }
}

unsafe fn push_bytes(state: *mut ffi::lua_State, bytes: &[u8]) {
    unsafe { ffi::lua_pushlstring(state, bytes.as_ptr() as *const c_char, bytes.len()) };
}

fn seconds_since_epoch(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The hidden per-event data: headers, receipt time and trace id.
enum Extra {
    Full(mlua::UserDataRef<EventExtra>),
    Packed(mlua::LuaString),
}

fn extra(table: &Table) -> mlua::Result<Extra> {
    match table.raw_get::<Value>(EXTRA)? {
        Value::UserData(data) => Ok(Extra::Full(data.borrow::<EventExtra>()?)),
        Value::String(packed) => Ok(Extra::Packed(packed)),
        _ => Err(not_an_event()),
    }
}

fn not_an_event() -> mlua::Error {
    mlua::Error::runtime("not an event table")
}

fn payload(lua: &Lua, table: &Table, data_key: &mlua::LuaString) -> mlua::Result<Value> {
    let data: mlua::LuaString = table.get(data_key)?;
    let bytes = data.as_bytes();
    if bytes.is_empty() {
        return Ok(Value::Nil);
    }
    match json::decode(lua, &bytes) {
        Ok(value) => Ok(value),
        Err(json::DecodeError::Json(err)) => Err(mlua::Error::external(PayloadError(err.to_string()))),
        Err(json::DecodeError::Lua(err)) => Err(err),
    }
}

/// Header name -> value, or a list of values when the header repeats.
pub fn headers_table(lua: &Lua, headers: Option<&HeaderMap>) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    for (name, values) in headers.into_iter().flat_map(|h| h.iter()) {
        let name = name.to_string();
        if let [single] = values.as_slice() {
            table.raw_set(name, single.as_str())?;
        } else {
            let list = lua.create_sequence_from(values.iter().map(|v| v.as_str()))?;
            table.raw_set(name, list)?;
        }
    }
    Ok(table)
}

fn meta(lua: &Lua, table: &Table) -> mlua::Result<Table> {
    let meta = lua.create_table()?;
    meta.raw_set("subject", table.raw_get::<Value>("subject")?)?;
    meta.raw_set("reply", table.get::<Value>("reply")?)?;
    match extra(table)? {
        Extra::Full(extra) => {
            meta.raw_set("trace_id", extra.trace_id.as_deref())?;
            meta.raw_set("span_id", extra.span_id.as_deref())?;
            match &extra.stream {
                Some(stream) => {
                    meta.raw_set("stream", &*stream.stream)?;
                    meta.raw_set("consumer", &*stream.consumer)?;
                    meta.raw_set("delivered", stream.delivered)?;
                    meta.raw_set("stream_seq", stream.stream_sequence)?;
                    meta.raw_set("pending", stream.pending)?;
                    meta.raw_set("timestamp", seconds_since_epoch(stream.published))?;
                    if let Some(keyed) = &stream.keyed {
                        meta.raw_set("partition", keyed.partition)?;
                        meta.raw_set("key", keyed.key.as_str())?;
                    }
                }
                None => {
                    meta.raw_set("delivered", 1)?;
                    meta.raw_set("timestamp", seconds_since_epoch(extra.received))?;
                }
            }
        }
        Extra::Packed(packed) => {
            let packed = packed.as_bytes();
            let fields = PackedFields::read(&packed).ok_or_else(not_an_event)?;
            if let Some(span) = fields.span.and_then(|span| std::str::from_utf8(span).ok()) {
                meta.raw_set("trace_id", trace_id_of(span))?;
                meta.raw_set("span_id", span_id_of(span))?;
            }
            let ack_subject = fields.ack_subject.and_then(|subject| std::str::from_utf8(subject).ok());
            match ack_subject.and_then(crate::ack_subject::parse) {
                Some(at) => {
                    meta.raw_set("stream", at.stream)?;
                    meta.raw_set("consumer", at.consumer)?;
                    meta.raw_set("delivered", at.delivered)?;
                    meta.raw_set("stream_seq", at.stream_sequence)?;
                    meta.raw_set("pending", at.pending)?;
                    let published = UNIX_EPOCH + std::time::Duration::from_nanos(at.published_unix_nanos);
                    meta.raw_set("timestamp", seconds_since_epoch(published))?;
                }
                None => {
                    meta.raw_set("delivered", 1)?;
                    meta.raw_set("timestamp", fields.received)?;
                }
            }
        }
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lua_api::raw;

    fn table_for(lua: &Lua, body: &str) -> Table {
        let event = Event::new("k".into(), "s.k".into(), None, None, bytes::Bytes::copy_from_slice(body.as_bytes()));
        let table = EventTables::new(lua).unwrap().build(lua, &event, None).unwrap();
        lua.globals().set("ev", &table).unwrap();
        table
    }

    #[test]
    fn the_payload_is_decoded_once_and_cached() {
        let lua = Lua::new();
        table_for(&lua, r#"{"a":[1,2,{"b":null}],"c":"x"}"#);
        let same: bool = lua.load("return ev.payload == ev.payload and rawget(ev, 'payload') ~= nil").eval().unwrap();
        assert!(same);
        let read: String = lua.load("return ev.payload.c .. #ev.payload.a").eval().unwrap();
        assert_eq!(read, "x3");
        let marked: bool =
            lua.load("return getmetatable(ev.payload.a) ~= nil and getmetatable(ev.payload) == nil").eval().unwrap();
        assert!(marked, "decoded arrays carry the array metatable, objects none");
    }

    #[test]
    fn an_empty_body_has_no_payload_and_a_bad_one_raises_the_payload_error() {
        let lua = Lua::new();
        table_for(&lua, "");
        assert_eq!(lua.load("return ev.payload").eval::<Value>().unwrap(), Value::Nil);
        table_for(&lua, "{not json");
        let err = lua.load("return ev.payload").eval::<Value>().unwrap_err();
        assert!(err.to_string().contains("payload is not valid JSON"), "{err}");
    }

    #[test]
    fn id_and_reply_read_the_same_packed_or_kept_and_long_ones_too() {
        let lua = Lua::new();
        let tables = EventTables::new(&lua).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "1");
        let long_reply = format!("_INBOX.{}", "r".repeat(300));
        for reply in [None, Some("_INBOX.abc.1"), Some(long_reply.as_str())] {
            for headers in [None, Some(headers.clone())] {
                let with_headers = headers.is_some();
                let event = Event::new("k".into(), "s.k".into(), reply.map(Into::into), headers, bytes::Bytes::new());
                lua.globals().set("ev", tables.build(&lua, &event, None).unwrap()).unwrap();
                let read: (String, Option<String>, Option<String>, String, String) =
                    lua.load("return ev.id, ev.reply, ev.meta.reply, ev.subject, ev.kind").eval().unwrap();
                assert_eq!(read.0, event.id.as_str(), "headers: {with_headers}");
                assert_eq!(read.1.as_deref(), reply, "headers: {with_headers}");
                assert_eq!(read.2.as_deref(), reply, "headers: {with_headers}");
                assert_eq!((read.3.as_str(), read.4.as_str()), ("s.k", "k"));
                let cached: bool = lua.load("return rawget(ev, 'id') == ev.id").eval().unwrap();
                assert!(cached, "the id is a plain field once read");
            }
        }
    }

    #[test]
    fn kinds_and_subjects_are_the_events_own_when_they_change() {
        let lua = Lua::new();
        let tables = EventTables::new(&lua).unwrap();
        for (kind, subject) in [("a", "s.1"), ("a", "s.1"), ("b", "s.1"), ("b", "s.2"), ("a", "s.1")] {
            let event = Event::new(kind.into(), subject.into(), None, None, bytes::Bytes::new());
            lua.globals().set("ev", tables.build(&lua, &event, None).unwrap()).unwrap();
            let read: (String, String) = lua.load("return ev.kind, ev.subject").eval().unwrap();
            assert_eq!((read.0.as_str(), read.1.as_str()), (kind, subject));
        }
    }

    /// Generated events (kinds, subjects, ids, reply subjects and spans of
    /// every length around the packing limits, with and without headers) read
    /// back field for field; `tests/memcheck` runs this under valgrind.
    #[test]
    fn generated_events_read_back_field_for_field() {
        let lua = Lua::new();
        let tables = EventTables::new(&lua).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut below = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let lengths = [0, 1, 39, 40, 41, 200, 230, 231, 240, 300, 440, 470, 471, 480, 600, 1000];
        let span = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for round in 0..300 {
            let mut text = |fill: &str| fill.repeat(lengths[below(lengths.len())]);
            let (kind, subject, id, reply, data) = (text("k"), text("s"), text("i"), text("r"), text("d"));
            let mut headers = HeaderMap::new();
            if !id.is_empty() {
                headers.insert("Nats-Msg-Id", id.as_str());
            }
            if below(3) == 0 {
                headers.insert("x-a", "1");
            }
            let headers = (!headers.is_empty()).then_some(headers);
            let reply = (below(4) != 0).then_some(reply);
            let data = bytes::Bytes::from(data);
            let event = Event::new(
                kind.as_str().into(),
                subject.as_str().into(),
                reply.clone().map(Into::into),
                headers,
                data.clone(),
            );
            let span = (below(2) == 0).then_some(span);
            lua.globals().set("ev", tables.build(&lua, &event, span).unwrap()).unwrap();
            let read: (String, String, String, Option<String>, mlua::LuaString, Option<String>) =
                lua.load("return ev.kind, ev.subject, ev.id, ev.reply, ev.data, ev.meta.span_id").eval().unwrap();
            let round = format!("round {round}");
            assert_eq!((read.0.as_str(), read.1.as_str()), (kind.as_str(), subject.as_str()), "{round}");
            assert_eq!(read.2, event.id.as_str(), "{round}");
            assert_eq!(read.3, reply, "{round}");
            assert_eq!(&*read.4.as_bytes(), &data[..], "{round}");
            assert_eq!(read.5.as_deref(), span.and_then(span_id_of), "{round}");
        }
    }

    #[test]
    fn the_builder_called_with_nothing_armed_raises() {
        let lua = Lua::new();
        let tables = EventTables::new(&lua).unwrap();
        let event = Event::new("k".into(), "s".into(), None, None, bytes::Bytes::new());
        tables.build(&lua, &event, None).unwrap();
        let err = tables.builder().call::<Value>(()).unwrap_err();
        assert!(err.to_string().contains("no event to build a table for"), "{err}");
    }

    #[test]
    fn other_keys_are_nil_and_headers_and_meta_still_work() {
        let lua = Lua::new();
        table_for(&lua, "1");
        let read: (Value, Value, String, String) =
            lua.load("return ev.other, ev[1], type(ev.headers), ev.meta.subject").eval().unwrap();
        assert_eq!((read.0, read.1), (Value::Nil, Value::Nil));
        assert_eq!((read.2.as_str(), read.3.as_str()), ("table", "s.k"));
    }

    #[test]
    fn meta_names_the_handlers_span_with_and_without_headers() {
        let lua = Lua::new();
        let tables = EventTables::new(&lua).unwrap();
        let span = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "1");
        for headers in [None, Some(headers)] {
            let event = Event::new("k".into(), "s".into(), None, headers, bytes::Bytes::new());
            lua.globals().set("ev", tables.build(&lua, &event, Some(span)).unwrap()).unwrap();
            let ids: (String, String, f64) =
                lua.load("return ev.meta.trace_id, ev.meta.span_id, ev.meta.timestamp").eval().unwrap();
            assert_eq!((ids.0.as_str(), ids.1.as_str()), ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"));
            assert!(ids.2 > 1.7e9, "the receipt time: {}", ids.2);
        }
        let event = Event::new("k".into(), "s".into(), None, None, bytes::Bytes::new());
        lua.globals().set("ev", tables.build(&lua, &event, None).unwrap()).unwrap();
        let untraced: (Value, Value) = lua.load("return ev.meta.trace_id, ev.meta.span_id").eval().unwrap();
        assert_eq!(untraced, (Value::Nil, Value::Nil));
    }

    #[test]
    fn a_stream_messages_meta_is_the_same_read_from_its_ack_subject_or_kept() {
        let lua = Lua::new();
        let tables = EventTables::new(&lua).unwrap();
        let ack = "$JS.ACK.ORDERS.work.3.1042.1040.1700000000123456789.7";
        let at = crate::ack_subject::parse(ack).unwrap();
        let meta = |ack_subject: Option<&str>, headers: Option<HeaderMap>| {
            let stream = StreamMeta {
                stream: at.stream.into(),
                consumer: at.consumer.into(),
                delivered: at.delivered,
                stream_sequence: at.stream_sequence,
                pending: at.pending,
                published: UNIX_EPOCH + std::time::Duration::from_nanos(at.published_unix_nanos),
                ack_subject: ack_subject.map(Into::into),
                keyed: None,
            };
            let event = Event::of_stream("k".into(), "orders.new".into(), headers, bytes::Bytes::new(), stream);
            lua.globals().set("ev", tables.build(&lua, &event, None).unwrap()).unwrap();
            let read: String = lua
                .load(
                    "local m = ev.meta
                     return table.concat({ m.stream, m.consumer, m.delivered, m.stream_seq, m.pending,
                                           string.format('%.9f', m.timestamp), m.subject, ev.id }, ' ')",
                )
                .eval()
                .unwrap();
            read
        };
        let expected = "ORDERS work 3 1042 7 1700000000.123456717 orders.new ORDERS:1042";
        assert_eq!(meta(Some(ack), None), expected, "read from the hidden ack subject");
        assert_eq!(meta(None, None), expected, "kept in the userdata");
        let mut headers = HeaderMap::new();
        headers.insert("x-a", "1");
        assert_eq!(meta(Some(ack), Some(headers)), expected, "with headers");
    }

    #[test]
    fn the_index_function_called_by_a_script_with_anything_answers_nil() {
        let lua = Lua::new();
        table_for(&lua, "[1]");
        let answers: (Value, Value, Value) = lua
            .load(
                "local index = getmetatable(ev).__index
                 return index(5, 'payload'), index({}, 'payload'), index(setmetatable({}, {}), 'meta')",
            )
            .eval()
            .unwrap();
        assert_eq!(answers, (Value::Nil, Value::Nil, Value::Nil));
    }

    #[test]
    fn a_payload_over_the_memory_limit_fails_the_read_and_the_vm_stays_sound() {
        let lua = Lua::new();
        lua.set_app_data(raw::MemoryLimited);
        let big = format!("[{}]", vec!["\"some text that takes room\""; 10_000].join(","));
        table_for(&lua, &big);
        lua.set_memory_limit(lua.used_memory() + 64 * 1024).unwrap();
        assert!(lua.load("return ev.payload").eval::<Value>().is_err());
        lua.set_memory_limit(0).unwrap();
        assert_eq!(lua.load("return #ev.payload").eval::<i64>().unwrap(), 10_000);
    }
}
