//! The fast path of JSON decoding: a reader that pushes each value onto the
//! Lua stack as it reads it, with no token list in between.
//!
//! It takes only what it can read exactly as serde_json reads it, and declines
//! the rest: a string with an escape, an integer of more than 18 digits, a
//! float out of range, nesting deeper than [`MAX_DEPTH`], or anything that is
//! not valid JSON. The caller then decodes with serde_json, which gives the
//! same value or the error that names the position. Nearly every event body
//! takes this path.
//!
//! Invariant of every function here: only references and plain numbers are
//! alive, so a Lua memory error raised by a push unwinds through these frames
//! skipping no destructor. The reader tracks the stack top itself and every
//! push is preceded by [`Reader::reserve`] for the slots it takes, which calls
//! `lua_checkstack` (declining when the stack cannot grow) only when the
//! slots reserved before run out.

use std::ffi::{c_char, c_int};
use std::ptr;

use mlua::ffi;

/// Deepest nesting read here; deeper documents go to serde_json, whose limit
/// (128) is the one users see.
const MAX_DEPTH: usize = 64;

/// Integers of up to this many digits fit an `i64` whatever the digits.
const MAX_INTEGER_DIGITS: usize = 18;

/// Stack slots reserved at a time beyond those asked for.
const RESERVE_AHEAD: c_int = 32;

/// Why the reader stopped: the caller decodes the document the slow way.
pub struct Declined;

type Read<T = ()> = Result<T, Declined>;

/// Pushes the JSON document `bytes` as one Lua value: objects as tables,
/// arrays as tables with the metatable at stack index `array_metatable`
/// (absolute), `null` as a NULL light userdata. On [`Declined`] the stack is
/// as it was.
///
/// # Safety
/// `state` is a valid Lua state with one free slot, `array_metatable` an
/// absolute index of a table on it. A Lua error may unwind out of this call
/// (out of memory): the caller runs it where that is safe.
pub unsafe fn push_document(state: *mut ffi::lua_State, bytes: &[u8], array_metatable: c_int) -> Read {
    let top = unsafe { ffi::lua_gettop(state) };
    let mut reader = Reader { state, bytes, at: 0, array_metatable, top, reserved: top };
    reader.skip_whitespace();
    // SAFETY: forwarded from the caller.
    let read = unsafe { reader.value(0) }.and_then(|()| {
        reader.skip_whitespace();
        if reader.at == bytes.len() { Ok(()) } else { Err(Declined) }
    });
    if read.is_err() {
        unsafe { ffi::lua_settop(state, top) };
    }
    read
}

struct Reader<'a> {
    state: *mut ffi::lua_State,
    bytes: &'a [u8],
    at: usize,
    array_metatable: c_int,
    /// The stack top, kept here as values are pushed and popped.
    top: c_int,
    /// The highest stack index known to be allocated.
    reserved: c_int,
}

/// Bytes a plain string run stops at: the closing quote, an escape, a
/// control character (invalid in JSON) and any byte of a multi-byte character.
static STOPS_STRING: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = byte < 0x20 || byte >= 0x80 || byte == b'"' as usize || byte == b'\\' as usize;
        byte += 1;
    }
    table
};

impl Reader<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.at += 1;
        }
    }

    fn expect(&mut self, literal: &[u8]) -> Read {
        if self.bytes[self.at..].starts_with(literal) {
            self.at += literal.len();
            Ok(())
        } else {
            Err(Declined)
        }
    }

    /// Makes sure `slots` more stack slots exist above the top, declining when
    /// the stack cannot grow.
    unsafe fn reserve(&mut self, slots: c_int) -> Read {
        debug_assert_eq!(unsafe { ffi::lua_gettop(self.state) }, self.top, "the reader's stack top");
        if self.top + slots <= self.reserved {
            return Ok(());
        }
        if unsafe { ffi::lua_checkstack(self.state, slots + RESERVE_AHEAD) } == 0 {
            return Err(Declined);
        }
        self.reserved = self.top + slots + RESERVE_AHEAD;
        Ok(())
    }

    /// Counts one value pushed.
    fn pushed(&mut self) {
        self.top += 1;
    }

    /// Pushes the value at the reader's position (whitespace skipped), `depth`
    /// containers deep.
    unsafe fn value(&mut self, depth: usize) -> Read {
        unsafe {
            self.reserve(1)?;
            match self.peek().ok_or(Declined)? {
                b'"' => self.string(),
                b'{' => self.object(depth + 1),
                b'[' => self.array(depth + 1),
                b't' => self.expect(b"true").map(|()| {
                    ffi::lua_pushboolean(self.state, 1);
                    self.pushed();
                }),
                b'f' => self.expect(b"false").map(|()| {
                    ffi::lua_pushboolean(self.state, 0);
                    self.pushed();
                }),
                b'n' => self.expect(b"null").map(|()| {
                    ffi::lua_pushlightuserdata(self.state, ptr::null_mut());
                    self.pushed();
                }),
                b'-' | b'0'..=b'9' => self.number(),
                _ => Err(Declined),
            }
        }
    }

    /// Pushes the string whose opening quote is at the position.
    unsafe fn string(&mut self) -> Read {
        let start = self.at + 1;
        let rest = &self.bytes[start..];
        let stop =
            |from: usize| rest[from..].iter().position(|&byte| STOPS_STRING[usize::from(byte)]).map(|at| from + at);
        let mut end = stop(0).ok_or(Declined)?;
        let mut ascii = true;
        while rest[end] != b'"' {
            if rest[end] < 0x80 {
                // An escape or a control character.
                return Err(Declined);
            }
            ascii = false;
            end = stop(end + 1).ok_or(Declined)?;
        }
        let text = &rest[..end];
        if !ascii && std::str::from_utf8(text).is_err() {
            return Err(Declined);
        }
        self.at = start + end + 1;
        unsafe { ffi::lua_pushlstring(self.state, text.as_ptr() as *const c_char, text.len()) };
        self.pushed();
        Ok(())
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
        self.at - start
    }

    /// Pushes the number at the position: an integer as a Lua integer, one
    /// with a fraction or an exponent as a float, as serde_json reads them.
    unsafe fn number(&mut self) -> Read {
        let start = self.at;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.at += 1;
        }
        let integer_start = self.at;
        let integer_digits = self.digits();
        if integer_digits == 0 || (integer_digits > 1 && self.bytes[integer_start] == b'0') {
            return Err(Declined);
        }
        let mut float = false;
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return Err(Declined);
            }
            float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            if self.digits() == 0 {
                return Err(Declined);
            }
            float = true;
        }
        if !float {
            if integer_digits > MAX_INTEGER_DIGITS {
                return Err(Declined);
            }
            let magnitude =
                self.bytes[integer_start..self.at].iter().fold(0i64, |sum, digit| sum * 10 + i64::from(digit - b'0'));
            unsafe {
                match (negative, magnitude) {
                    // serde_json reads `-0` as the float -0.0.
                    (true, 0) => ffi::lua_pushnumber(self.state, -0.0),
                    (true, _) => ffi::lua_pushinteger(self.state, -magnitude),
                    (false, _) => ffi::lua_pushinteger(self.state, magnitude),
                }
            }
            self.pushed();
            return Ok(());
        }
        // The bytes are ASCII digits, signs, `.` and `e` by the checks above.
        let text = std::str::from_utf8(&self.bytes[start..self.at]).map_err(|_| Declined)?;
        let number: f64 = text.parse().map_err(|_| Declined)?;
        if !number.is_finite() {
            return Err(Declined);
        }
        unsafe { ffi::lua_pushnumber(self.state, number) };
        self.pushed();
        Ok(())
    }

    /// Reads the members of the object or array whose opening bracket is at
    /// the position, up to `close`, each with `member`, above a slot pushed
    /// for the table. Returns that slot's index and the number of members.
    unsafe fn members(
        &mut self,
        depth: usize,
        close: u8,
        member: impl Fn(&mut Self, usize) -> Read,
    ) -> Read<(c_int, c_int)> {
        if depth > MAX_DEPTH {
            return Err(Declined);
        }
        unsafe {
            ffi::lua_pushnil(self.state);
        }
        self.pushed();
        let table = self.top;
        self.at += 1;
        self.skip_whitespace();
        let mut count: c_int = 0;
        if self.peek() == Some(close) {
            self.at += 1;
            return Ok((table, count));
        }
        loop {
            member(self, depth)?;
            count = count.checked_add(1).ok_or(Declined)?;
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => {
                    self.at += 1;
                    self.skip_whitespace();
                }
                Some(byte) if byte == close => {
                    self.at += 1;
                    return Ok((table, count));
                }
                _ => return Err(Declined),
            }
        }
    }

    /// Pushes an object member's key and value.
    unsafe fn key_and_value(&mut self, depth: usize) -> Read {
        if self.peek() != Some(b'"') {
            return Err(Declined);
        }
        unsafe {
            self.reserve(2)?;
            self.string()?;
            self.skip_whitespace();
            self.expect(b":")?;
            self.skip_whitespace();
            self.value(depth)
        }
    }

    /// Pushes the object whose `{` is at the position. Members are pushed
    /// first and stored once counted, so the table is made at its final size;
    /// they are stored in document order, so a repeated key keeps its last value.
    unsafe fn object(&mut self, depth: usize) -> Read {
        unsafe {
            let (table, count) = self.members(depth, b'}', |reader, depth| reader.key_and_value(depth))?;
            self.reserve(3)?;
            ffi::lua_createtable(self.state, 0, count);
            ffi::lua_replace(self.state, table);
            for member in 0..count {
                ffi::lua_pushvalue(self.state, table + 1 + 2 * member);
                ffi::lua_pushvalue(self.state, table + 2 + 2 * member);
                ffi::lua_rawset(self.state, table);
            }
            ffi::lua_settop(self.state, table);
            self.top = table;
        }
        Ok(())
    }

    /// Pushes the array whose `[` is at the position, made at its final size
    /// like an object.
    unsafe fn array(&mut self, depth: usize) -> Read {
        unsafe {
            let (table, count) = self.members(depth, b']', |reader, depth| reader.value(depth))?;
            self.reserve(2)?;
            ffi::lua_createtable(self.state, count, 0);
            ffi::lua_replace(self.state, table);
            // Each store takes the item on top, so the items go last to first.
            for index in (1..=count).rev() {
                ffi::lua_rawseti(self.state, table, ffi::lua_Integer::from(index));
            }
            ffi::lua_pushvalue(self.state, self.array_metatable);
            ffi::lua_setmetatable(self.state, table);
            self.top = table;
        }
        Ok(())
    }
}
