//! JSON <-> Lua, the hot path of every request.
//!
//! Decoding reads the bytes straight onto the Lua stack ([`json_to_stack`]);
//! what that reader declines (escaped strings, huge integers, invalid JSON) is
//! parsed by serde_json into a flat token tape in safe Rust, then built on the
//! Lua stack in one protected call. Encoding walks the
//! Lua value on the stack and writes bytes. Neither goes through mlua's per-value
//! handles, which cost more than the JSON itself. Inside the raw sections only
//! references and plain numbers are alive, so a Lua memory error that unwinds
//! out of them skips no destructor.
//!
//! Conventions: `null` is `json.null` (a NULL light userdata); decoded arrays carry
//! mlua's array metatable so an empty array encodes back as `[]`; a table with a
//! positive length encodes as an array of its items `1..#t`, any other table as an
//! object (integer keys become strings).

use std::borrow::Cow;
use std::ffi::{c_char, c_int};
use std::fmt;
use std::ptr;

use mlua::{Lua, LuaSerdeExt, Value, ffi};

use crate::lua_api::{json_to_stack, raw};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Deepest nesting accepted by the encoder; cyclic tables hit it.
const MAX_DEPTH: usize = 128;

/// A decoding failure: the JSON is invalid, or Lua ran out of memory.
#[derive(Debug)]
pub enum DecodeError {
    Json(serde_json::Error),
    Lua(mlua::Error),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Json(err) => err.fmt(f),
            DecodeError::Lua(err) => err.fmt(f),
        }
    }
}

/// Decodes JSON `bytes` into a Lua value.
pub fn decode(lua: &Lua, bytes: &[u8]) -> Result<Value, DecodeError> {
    let array_metatable = Value::Table(lua.array_metatable());
    // SAFETY: the reader reserves each slot it pushes, holds only references,
    // and leaves one value (nil when it declines).
    let direct = unsafe {
        raw::build_value(lua, &[&array_metatable], 0, |state, base| {
            if json_to_stack::push_document(state, bytes, base + 1).is_err() {
                ffi::lua_pushnil(state);
            }
        })
    }
    .map_err(DecodeError::Lua)?;
    if !direct.is_nil() {
        return Ok(direct);
    }
    let tape = Tape::parse(bytes).map_err(DecodeError::Json)?;
    // Each nesting level holds a table, a key and a value.
    let slots = 3 * (tape.depth + 1);
    // SAFETY: push_token pushes one value within those slots and holds only
    // references.
    unsafe {
        raw::build_value(lua, &[&array_metatable], slots, |state, base| {
            let mut position = 0;
            push_token(state, &tape.tokens, &mut position, base + 1);
        })
    }
    .map_err(DecodeError::Lua)
}

/// Pushes the JSON document `bytes` onto `state` inside protected calls, so a
/// Lua error (memory) stops there and never unwinds through the caller's
/// frame. Decoded arrays get the metatable at stack index `array_metatable`.
/// Returns whether it succeeded; on failure (invalid JSON, out of memory) the
/// stack is as it was.
///
/// # Safety
/// `state` has 4 free slots and `array_metatable` is an absolute index of a
/// table on it; the protected calls reserve what the value needs.
pub unsafe fn push_protected(state: *mut ffi::lua_State, bytes: &[u8], array_metatable: c_int) -> bool {
    unsafe {
        let top = ffi::lua_gettop(state);
        ffi::lua_pushcfunction(state, push_direct);
        ffi::lua_pushlightuserdata(state, &bytes as *const &[u8] as *mut std::ffi::c_void);
        ffi::lua_pushvalue(state, array_metatable);
        if ffi::lua_pcall(state, 2, 1, 0) == ffi::LUA_OK && ffi::lua_type(state, -1) != ffi::LUA_TNIL {
            return true;
        }
        ffi::lua_settop(state, top);
        match Tape::parse(bytes) {
            Ok(tape) => Parsed(tape).push_protected(state, array_metatable),
            Err(_) => false,
        }
    }
}

/// The protected body of the fast path of [`push_protected`]: arguments (the
/// bytes as a light userdata pointing at a `&[u8]`, the array metatable),
/// result the value, or nothing (nil) when the reader declines.
unsafe extern "C-unwind" fn push_direct(state: *mut ffi::lua_State) -> c_int {
    unsafe {
        // SAFETY: `push_protected` passes a slice reference that outlives this call.
        let bytes = *(ffi::lua_touserdata(state, 1) as *const &[u8]);
        match json_to_stack::push_document(state, bytes, 2) {
            Ok(()) => 1,
            Err(_) => 0,
        }
    }
}

/// A JSON document parsed in Rust and not yet on a Lua stack.
struct Parsed<'a>(Tape<'a>);

impl Parsed<'_> {
    /// Pushes the document onto `state` inside a protected call, so a Lua
    /// error (memory) stops at that call and never unwinds through the
    /// caller's frame, which owns this document. Decoded arrays get the
    /// metatable at stack index `array_metatable`. Returns whether it
    /// succeeded; on failure the stack is as it was.
    ///
    /// # Safety
    /// `state` has 4 free slots and `array_metatable` is an absolute index of
    /// a table on it; the protected call reserves what the value needs.
    unsafe fn push_protected(&self, state: *mut ffi::lua_State, array_metatable: c_int) -> bool {
        unsafe {
            let top = ffi::lua_gettop(state);
            ffi::lua_pushcfunction(state, push_parsed);
            ffi::lua_pushlightuserdata(state, self as *const Parsed as *mut std::ffi::c_void);
            ffi::lua_pushvalue(state, array_metatable);
            if ffi::lua_pcall(state, 2, 1, 0) == ffi::LUA_OK {
                return true;
            }
            ffi::lua_settop(state, top);
            false
        }
    }
}

/// The protected body of [`Parsed::push_protected`]: arguments (the parsed
/// document as a light userdata, the array metatable), result the value. It
/// holds only references and plain numbers, so an error raised by a push
/// unwinds out of it skipping no destructor.
unsafe extern "C-unwind" fn push_parsed(state: *mut ffi::lua_State) -> c_int {
    unsafe {
        // SAFETY: `push_protected` passes a `Parsed` that outlives this call.
        let parsed = &*(ffi::lua_touserdata(state, 1) as *const Parsed);
        let slots = c_int::try_from(3 * (parsed.0.depth + 1) + 2).unwrap_or(c_int::MAX);
        ffi::luaL_checkstack(state, slots, c"JSON value too deep for the Lua stack".as_ptr());
        let mut position = 0;
        push_token(state, &parsed.0.tokens, &mut position, 2);
        1
    }
}

/// Encodes a Lua value as JSON.
pub fn encode(lua: &Lua, value: &Value) -> Result<Vec<u8>, String> {
    Encoding::new(lua).encode(lua, value)
}

/// Encodes Lua values of one VM as JSON, holding what every encoding needs:
/// looking up mlua's array metatable costs more than encoding a small table.
pub struct Encoding {
    array_metatable: Value,
}

impl Encoding {
    pub fn new(lua: &Lua) -> Self {
        Encoding { array_metatable: Value::Table(lua.array_metatable()) }
    }

    /// Encodes `value`, a value of the VM this was made for.
    pub fn encode(&self, lua: &Lua, value: &Value) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(128);
        // The walk only reads (lua_next, lua_tolstring on strings, lua_getmetatable):
        // nothing in it allocates in Lua or raises.
        let walked = raw::read_value(lua, &[value, &self.array_metatable], |state, base| unsafe {
            Encoder { state, array_metatable: base + 2, out: &mut out }.value(base + 1, 0)
        });
        match walked {
            Ok(Ok(())) => Ok(out),
            Ok(Err(message)) => Err(message),
            Err(err) => Err(err.to_string()),
        }
    }
}

/// The `json` global: `encode`, `decode`, `null`.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    let json = lua.create_table()?;
    json.set(
        "encode",
        lua.create_function(|lua, value: Value| {
            let bytes = encode(lua, &value).map_err(|err| mlua::Error::runtime(format!("json.encode: {err}")))?;
            lua.create_string(bytes)
        })?,
    )?;
    json.set(
        "decode",
        lua.create_function(|lua, text: mlua::LuaString| {
            decode(lua, &text.as_bytes()).map_err(|err| mlua::Error::runtime(format!("json.decode: {err}")))
        })?,
    )?;
    json.set("null", lua.null())?;
    lua.globals().set("json", json)
}

enum Token<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Array(usize),
    Object(usize),
}

struct Tape<'a> {
    tokens: Vec<Token<'a>>,
    /// Deepest nesting seen, for sizing the Lua stack.
    depth: usize,
    open: usize,
}

impl<'a> Tape<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, serde_json::Error> {
        let mut tape = Tape { tokens: Vec::with_capacity(16), depth: 0, open: 0 };
        // A body that is UTF-8 as a whole (nearly every one) is checked once,
        // a word at a time, instead of string by string as it is parsed; any
        // other is parsed from bytes, so the error names where it breaks.
        match std::str::from_utf8(bytes) {
            Ok(text) => tape.fill(serde_json::Deserializer::from_str(text))?,
            Err(_) => tape.fill(serde_json::Deserializer::from_slice(bytes))?,
        }
        Ok(tape)
    }

    fn fill<R: serde_json::de::Read<'a>>(
        &mut self,
        mut deserializer: serde_json::Deserializer<R>,
    ) -> serde_json::Result<()> {
        TapeSeed(self).deserialize(&mut deserializer)?;
        deserializer.end()
    }
}

impl<'a> Tape<'a> {
    fn open_container(&mut self, placeholder: Token<'a>) -> usize {
        self.open += 1;
        self.depth = self.depth.max(self.open);
        self.tokens.push(placeholder);
        self.tokens.len() - 1
    }

    fn close_container(&mut self, start: usize, token: Token<'a>) {
        self.open -= 1;
        self.tokens[start] = token;
    }
}

struct TapeSeed<'t, 'a>(&'t mut Tape<'a>);

impl<'de> DeserializeSeed<'de> for TapeSeed<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TapeSeed<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.tokens.push(Token::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.tokens.push(Token::Int(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.tokens.push(i64::try_from(v).map(Token::Int).unwrap_or(Token::Float(v as f64)));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.0.tokens.push(Token::Float(v));
        Ok(())
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<(), E> {
        self.0.tokens.push(Token::Str(Cow::Borrowed(v)));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.tokens.push(Token::Str(Cow::Owned(v.to_string())));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.tokens.push(Token::Null);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let start = self.0.open_container(Token::Array(0));
        let mut count = 0;
        while seq.next_element_seed(TapeSeed(self.0))?.is_some() {
            count += 1;
        }
        self.0.close_container(start, Token::Array(count));
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let start = self.0.open_container(Token::Object(0));
        let mut count = 0;
        while map.next_key_seed(TapeSeed(self.0))?.is_some() {
            map.next_value_seed(TapeSeed(self.0))?;
            count += 1;
        }
        self.0.close_container(start, Token::Object(count));
        Ok(())
    }
}

/// Pushes the value starting at `tokens[*position]`; the array metatable is at
/// stack index `array_metatable`.
unsafe fn push_token(state: *mut ffi::lua_State, tokens: &[Token<'_>], position: &mut usize, array_metatable: c_int) {
    let token = &tokens[*position];
    *position += 1;
    unsafe {
        match token {
            Token::Null => ffi::lua_pushlightuserdata(state, ptr::null_mut()),
            Token::Bool(b) => ffi::lua_pushboolean(state, c_int::from(*b)),
            Token::Int(i) => ffi::lua_pushinteger(state, *i),
            Token::Float(f) => ffi::lua_pushnumber(state, *f),
            Token::Str(s) => push_str(state, s),
            Token::Array(count) => {
                ffi::lua_createtable(state, c_int::try_from(*count).unwrap_or(c_int::MAX), 0);
                for index in 1..=*count {
                    push_token(state, tokens, position, array_metatable);
                    ffi::lua_rawseti(state, -2, index as ffi::lua_Integer);
                }
                ffi::lua_pushvalue(state, array_metatable);
                ffi::lua_setmetatable(state, -2);
            }
            Token::Object(count) => {
                ffi::lua_createtable(state, 0, c_int::try_from(*count).unwrap_or(c_int::MAX));
                for _ in 0..*count {
                    push_token(state, tokens, position, array_metatable);
                    push_token(state, tokens, position, array_metatable);
                    ffi::lua_rawset(state, -3);
                }
            }
        }
    }
}

unsafe fn push_str(state: *mut ffi::lua_State, s: &str) {
    unsafe { ffi::lua_pushlstring(state, s.as_ptr() as *const c_char, s.len()) };
}

/// Writes Lua values from the stack as JSON.
struct Encoder<'a> {
    state: *mut ffi::lua_State,
    /// Stack index of mlua's array metatable.
    array_metatable: c_int,
    out: &'a mut Vec<u8>,
}

impl Encoder<'_> {
    /// Writes the value at stack `index` (absolute).
    unsafe fn value(&mut self, index: c_int, depth: usize) -> Result<(), String> {
        let state = self.state;
        unsafe {
            match ffi::lua_type(state, index) {
                ffi::LUA_TNIL => self.out.extend_from_slice(b"null"),
                ffi::LUA_TBOOLEAN => {
                    let text: &[u8] = if ffi::lua_toboolean(state, index) != 0 { b"true" } else { b"false" };
                    self.out.extend_from_slice(text)
                }
                ffi::LUA_TNUMBER => {
                    if ffi::lua_isinteger(state, index) != 0 {
                        write_integer(self.out, ffi::lua_tointeger(state, index));
                    } else {
                        let number = ffi::lua_tonumber(state, index);
                        if !number.is_finite() {
                            return Err(format!("cannot encode {number} as JSON"));
                        }
                        serde_json::to_writer(&mut *self.out, &number).map_err(|err| err.to_string())?;
                    }
                }
                ffi::LUA_TSTRING => write_string(self.out, lua_bytes(state, index))?,
                ffi::LUA_TLIGHTUSERDATA if ffi::lua_touserdata(state, index).is_null() => {
                    self.out.extend_from_slice(b"null")
                }
                ffi::LUA_TTABLE => self.table(index, depth)?,
                other => return Err(format!("cannot encode a {} as JSON", type_name(state, other))),
            }
        }
        Ok(())
    }

    unsafe fn table(&mut self, index: c_int, depth: usize) -> Result<(), String> {
        if depth >= MAX_DEPTH {
            return Err(format!("tables nest deeper than {MAX_DEPTH} (is one inside itself?)"));
        }
        let state = self.state;
        unsafe {
            if ffi::lua_checkstack(state, 4) == 0 {
                return Err("Lua stack exhausted".to_string());
            }
            let length = ffi::lua_rawlen(state, index);
            let is_array = length > 0 || {
                let has_metatable = ffi::lua_getmetatable(state, index) != 0;
                let array = has_metatable && ffi::lua_rawequal(state, -1, self.array_metatable) != 0;
                if has_metatable {
                    ffi::lua_pop(state, 1);
                }
                array
            };
            if is_array {
                self.out.push(b'[');
                for item in 1..=length {
                    if item > 1 {
                        self.out.push(b',');
                    }
                    ffi::lua_rawgeti(state, index, item as ffi::lua_Integer);
                    let result = self.value(ffi::lua_gettop(state), depth + 1);
                    ffi::lua_pop(state, 1);
                    result?;
                }
                self.out.push(b']');
                return Ok(());
            }
            self.out.push(b'{');
            let mut first = true;
            ffi::lua_pushnil(state);
            while ffi::lua_next(state, index) != 0 {
                let top = ffi::lua_gettop(state);
                if !first {
                    self.out.push(b',');
                }
                first = false;
                let result = self.key(top - 1).and_then(|()| {
                    self.out.push(b':');
                    self.value(top, depth + 1)
                });
                if let Err(err) = result {
                    ffi::lua_pop(state, 2);
                    return Err(err);
                }
                ffi::lua_pop(state, 1);
            }
            self.out.push(b'}');
        }
        Ok(())
    }

    /// Writes an object key: strings as they are, integers as strings.
    unsafe fn key(&mut self, index: c_int) -> Result<(), String> {
        let state = self.state;
        unsafe {
            match ffi::lua_type(state, index) {
                ffi::LUA_TSTRING => write_string(self.out, lua_bytes(state, index)),
                ffi::LUA_TNUMBER if ffi::lua_isinteger(state, index) != 0 => {
                    self.out.push(b'"');
                    write_integer(self.out, ffi::lua_tointeger(state, index));
                    self.out.push(b'"');
                    Ok(())
                }
                other => Err(format!("cannot encode a table key of type {} as JSON", type_name(state, other))),
            }
        }
    }
}

unsafe fn type_name(state: *mut ffi::lua_State, type_code: c_int) -> String {
    unsafe { std::ffi::CStr::from_ptr(ffi::lua_typename(state, type_code)).to_string_lossy().into_owned() }
}

unsafe fn lua_bytes<'a>(state: *mut ffi::lua_State, index: c_int) -> &'a [u8] {
    unsafe {
        let mut length = 0;
        let data = ffi::lua_tolstring(state, index, &mut length);
        std::slice::from_raw_parts(data as *const u8, length)
    }
}

fn write_string(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), String> {
    // Most keys and values are printable ASCII with nothing to escape: one
    // copy, without the UTF-8 check and the escaping writer.
    if is_plain(bytes) {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return Ok(());
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| "cannot encode a string that is not UTF-8 as JSON".to_string())?;
    serde_json::to_writer(&mut *out, text).map_err(|err| err.to_string())
}

/// Whether every byte is printable ASCII other than `"` and `\`, tested eight
/// bytes at a time (the classic "has a byte less than n / equal to c" word
/// tricks, exact when answering "any?").
fn is_plain(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let has_zero = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS != 0;
    let plain_byte = |byte: u8| (0x20..0x80).contains(&byte) && byte != b'"' && byte != b'\\';
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(word);
        let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS != 0;
        let quote = has_zero(word ^ (ONES * u64::from(b'"')));
        let backslash = has_zero(word ^ (ONES * u64::from(b'\\')));
        if word & HIGHS != 0 || below_space || quote || backslash {
            return false;
        }
    }
    words.remainder().iter().all(|&byte| plain_byte(byte))
}

fn write_integer(out: &mut Vec<u8>, value: i64) {
    // Writing an integer into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(text: &str) -> String {
        let lua = Lua::new();
        let value = decode(&lua, text.as_bytes()).unwrap();
        String::from_utf8(encode(&lua, &value).unwrap()).unwrap()
    }

    fn encoded(lua: &Lua, source: &str) -> Result<String, String> {
        let value: Value = lua.load(source).eval().unwrap();
        encode(lua, &value).map(|bytes| String::from_utf8(bytes).unwrap())
    }

    #[test]
    fn values_survive_a_roundtrip() {
        assert_eq!(roundtrip(r#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(roundtrip(r#"[1,2.5,"x",true,false,null]"#), r#"[1,2.5,"x",true,false,null]"#);
        assert_eq!(roundtrip(r#"{"empty":[],"obj":{}}"#).len(), r#"{"empty":[],"obj":{}}"#.len());
        assert_eq!(roundtrip(r#""h\u00e9llo \"q\" \n""#), r#""héllo \"q\" \n""#);
        assert_eq!(roundtrip("18446744073709551615"), "1.8446744073709552e+19");
        assert_eq!(roundtrip("-9223372036854775808"), "-9223372036854775808");
        assert_eq!(roundtrip("[[[[1]]]]"), "[[[[1]]]]");
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        for text in
            ["plain", "", "q\"uote", "back\\slash", "tab\tnew\nline", "\u{1}\u{1f}", "\u{7f}", "héllo", "/", "日本"]
        {
            let mut out = Vec::new();
            write_string(&mut out, text.as_bytes()).unwrap();
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(text).unwrap(), "{text:?}");
        }
        assert!(write_string(&mut Vec::new(), b"\xff").is_err());
        // Each byte that needs care, at every position of a word and its remainder.
        for special in [0x00u8, 0x01, 0x1f, b'"', b'\\', 0x80, 0xc3, 0xff] {
            for at in 0..19 {
                let mut bytes = vec![b'a'; 19];
                bytes[at] = special;
                assert!(!is_plain(&bytes), "{special:#x} at {at}");
            }
        }
        for plain in [0x20u8, 0x21, 0x23, 0x5b, 0x5d, 0x7e, 0x7f] {
            assert!(is_plain(&[plain; 19]), "{plain:#x}");
        }
    }

    #[test]
    fn floats_roundtrip_exactly() {
        for text in ["12409406.297733545", "2.4703282292062328e-324", "0.1", "1.7976931348623157e308", "-5e-324"] {
            let expected: f64 = text.parse().unwrap();
            let back: f64 = roundtrip(text).parse().unwrap();
            assert_eq!(back.to_bits(), expected.to_bits(), "{text}");
        }
    }

    #[test]
    fn bad_json_is_an_error_that_says_where() {
        let lua = Lua::new();
        let err = decode(&lua, b"{\"a\": }").unwrap_err();
        assert!(err.to_string().contains("column"), "{err}");
        assert!(decode(&lua, b"{} trailing").is_err());
        let deep = "[".repeat(10_000);
        assert!(decode(&lua, deep.as_bytes()).is_err());
    }

    #[test]
    fn lua_tables_encode_as_objects_or_arrays() {
        let lua = Lua::new();
        let text = encoded(&lua, "return { list = {1, 2}, map = { k = 'v' }, n = 1.5, i = -3, t = true }").unwrap();
        for part in [r#""list":[1,2]"#, r#""map":{"k":"v"}"#, r#""n":1.5"#, r#""i":-3"#, r#""t":true"#] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert_eq!(encoded(&lua, "return {}").unwrap(), "{}");
        assert_eq!(encoded(&lua, "return { [7] = 'x' }").unwrap(), r#"{"7":"x"}"#);
        assert_eq!(encoded(&lua, "return 'tab\\t'").unwrap(), r#""tab\t""#);
        assert_eq!(encoded(&lua, "return nil").unwrap(), "null");
    }

    #[test]
    fn unencodable_values_are_errors() {
        let lua = Lua::new();
        assert!(encoded(&lua, "return { f = print }").unwrap_err().contains("function"));
        assert!(encoded(&lua, "local t = {}; t.self = t; return t").unwrap_err().contains("deeper"));
        assert!(encoded(&lua, "return 0/0").unwrap_err().contains("NaN"));
        assert!(encoded(&lua, "return { [true] = 1 }").unwrap_err().contains("key of type boolean"));
        assert!(encoded(&lua, "return '\\255'").unwrap_err().contains("UTF-8"));
    }

    /// `depth` nested objects (`{"a":...}`) or arrays around `1`.
    fn nested(depth: usize, object: bool) -> String {
        let (open, close) = if object { (r#"{"a":"#, "}") } else { ("[", "]") };
        format!("{}1{}", open.repeat(depth), close.repeat(depth))
    }

    /// Every nesting depth serde_json accepts decodes and encodes back unchanged,
    /// protected or not, and leaves the VM answering a plain value: a push past
    /// the reserved Lua stack would crash here or corrupt what follows.
    #[test]
    fn every_accepted_depth_roundtrips_and_leaves_the_vm_sound() {
        for limited in [false, true] {
            let lua = Lua::new();
            if limited {
                lua.set_app_data(raw::MemoryLimited);
                lua.set_memory_limit(64 * 1024 * 1024).unwrap();
            }
            for depth in 1..=300 {
                for object in [true, false] {
                    let text = nested(depth, object);
                    match decode(&lua, text.as_bytes()) {
                        Ok(value) => assert_eq!(String::from_utf8(encode(&lua, &value).unwrap()).unwrap(), text),
                        Err(DecodeError::Json(err)) => {
                            assert!(depth > 100, "depth {depth} refused: {err}");
                            assert!(err.to_string().contains("recursion limit"), "{err}");
                        }
                        Err(err) => panic!("depth {depth}, limited {limited}: {err}"),
                    }
                    assert_eq!(roundtrip_in(&lua, r#"{"plain":[1,"two"]}"#), r#"{"plain":[1,"two"]}"#);
                }
            }
            lua.gc_collect().unwrap();
        }
    }

    fn roundtrip_in(lua: &Lua, text: &str) -> String {
        let value = decode(lua, text.as_bytes()).unwrap();
        String::from_utf8(encode(lua, &value).unwrap()).unwrap()
    }

    /// The value `bytes` decode to through serde_json's tape alone, encoded
    /// and read back as a `serde_json::Value` (which tells integers from floats).
    fn through_the_tape(lua: &Lua, bytes: &[u8]) -> Option<serde_json::Value> {
        let tape = Tape::parse(bytes).ok()?;
        let array_metatable = Value::Table(lua.array_metatable());
        let value = unsafe {
            raw::build_value(lua, &[&array_metatable], 3 * (tape.depth + 1), |state, base| {
                push_token(state, &tape.tokens, &mut 0, base + 1);
            })
        }
        .unwrap();
        Some(serde_json::from_slice(&encode(lua, &value).unwrap()).unwrap())
    }

    /// The same through the direct reader alone; `None` when it declines.
    fn through_the_reader(lua: &Lua, bytes: &[u8]) -> Option<serde_json::Value> {
        let array_metatable = Value::Table(lua.array_metatable());
        let value = unsafe {
            raw::build_value(lua, &[&array_metatable], 0, |state, base| {
                if json_to_stack::push_document(state, bytes, base + 1).is_err() {
                    ffi::lua_pushnil(state);
                }
            })
        }
        .unwrap();
        (!value.is_nil()).then(|| serde_json::from_slice(&encode(lua, &value).unwrap()).unwrap())
    }

    /// A random JSON-like text: mostly valid, with escapes, multi-byte
    /// characters, numbers at every edge serde_json has, odd whitespace.
    fn random_text(rng: &mut u64, out: &mut Vec<u8>, depth: usize) {
        fn below(rng: &mut u64, n: u64) -> u64 {
            *rng ^= *rng >> 12;
            *rng ^= *rng << 25;
            *rng ^= *rng >> 27;
            rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
        const NUMBERS: &[&str] = &[
            "0",
            "-0",
            "1",
            "-1",
            "7",
            "01",
            "-01",
            "1.",
            "1.5",
            "-1.5e3",
            "1e400",
            "-1e400",
            "1e-400",
            "0.1",
            "1E+2",
            "1e-2",
            ".5",
            "-",
            "2.5e-324",
            "123456789012345678",
            "-123456789012345678",
            "1234567890123456789",
            "-9223372036854775808",
            "18446744073709551615",
            "18446744073709551616",
            "0.0",
            "-0.0",
            "1e",
            "1e+",
            "12409406.297733545",
            "9007199254740993",
            "1.7976931348623157e308",
        ];
        const STRINGS: &[&str] = &[
            "",
            "a",
            "key",
            "héllo",
            "日本",
            r#"q\"uote"#,
            r"back\\slash",
            r"tab\t",
            r"\u00e9",
            r"\ud83d\ude00",
            r"\ud83d",
            r"bad\x",
            "\t",
            "\u{1}",
            "\u{7f}",
            "/",
            r"\/",
        ];
        let whitespace = |out: &mut Vec<u8>, pick: u64| {
            out.extend_from_slice([&b""[..], b"", b"", b" ", b"\n\t", b"\r "][pick as usize % 6])
        };
        whitespace(out, below(rng, 6));
        let leaf = depth >= 6 || below(rng, 3) == 0;
        match if leaf { below(rng, 4) } else { 4 + below(rng, 2) } {
            0 => out.extend_from_slice([&b"null"[..], b"true", b"false", b"tru", b"nul"][below(rng, 5) as usize]),
            1 => out.extend_from_slice(NUMBERS[below(rng, NUMBERS.len() as u64) as usize].as_bytes()),
            2 => out.extend_from_slice(format!("{}", below(rng, 1 << 40) as i64 - (1 << 39)).as_bytes()),
            3 => {
                out.extend_from_slice(format!("\"{}\"", STRINGS[below(rng, STRINGS.len() as u64) as usize]).as_bytes())
            }
            4 => {
                out.push(b'[');
                for item in 0..below(rng, 5) {
                    if item > 0 {
                        out.push(b',');
                    }
                    random_text(rng, out, depth + 1);
                }
                out.push(b']');
            }
            _ => {
                out.push(b'{');
                for item in 0..below(rng, 5) {
                    if item > 0 {
                        out.push(b',');
                    }
                    // Repeated keys now and then: the last one wins.
                    out.extend_from_slice(format!("\"k{}\":", below(rng, 4)).as_bytes());
                    random_text(rng, out, depth + 1);
                }
                out.push(b'}');
            }
        }
        whitespace(out, below(rng, 6));
    }

    /// The direct reader gives exactly serde_json's value for every document
    /// it reads, and declines every document serde_json refuses.
    #[test]
    fn the_direct_reader_agrees_with_serde_json() {
        let lua = Lua::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let (mut read, mut valid) = (0, 0);
        for case in 0..4000 {
            let mut text = Vec::new();
            random_text(&mut rng, &mut text, 0);
            if case % 3 == 0 && !text.is_empty() {
                // A damaged copy: one byte replaced, inserted or removed.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                let at = (rng % text.len() as u64) as usize;
                let byte = b"\"\\,:[]{} 0-.eE\x80\xff\x00x"[(rng >> 20) as usize % 18];
                match (rng >> 40) % 3 {
                    0 => text[at] = byte,
                    1 => text.insert(at, byte),
                    _ => drop(text.remove(at)),
                }
            }
            let expected = through_the_tape(&lua, &text);
            let got = through_the_reader(&lua, &text);
            let shown = String::from_utf8_lossy(&text);
            valid += usize::from(expected.is_some());
            if let Some(got) = got {
                read += 1;
                assert_eq!(Some(&got), expected.as_ref(), "{shown}");
                // `Value` equality takes -0.0 for 0.0; the encoding does not.
                let encoded = |value: &serde_json::Value| value.to_string();
                assert_eq!(encoded(&got), encoded(expected.as_ref().unwrap()), "{shown}");
            }
        }
        assert!(read * 2 > valid, "the reader declined too much: read {read} of {valid} valid documents");
        assert_eq!(through_the_reader(&lua, b"-0").unwrap().to_string(), "-0.0");
    }

    #[test]
    fn decoding_respects_the_memory_limit() {
        let lua = Lua::new();
        lua.set_app_data(raw::MemoryLimited);
        lua.set_memory_limit(lua.used_memory() + 64 * 1024).unwrap();
        let big = format!("[{}]", vec!["\"some text that takes room\""; 10_000].join(","));
        assert!(matches!(decode(&lua, big.as_bytes()), Err(DecodeError::Lua(_))));
        lua.set_memory_limit(0).unwrap();
        assert!(decode(&lua, b"[1]").is_ok(), "the VM is fine afterwards");
    }
}
