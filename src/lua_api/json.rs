//! JSON <-> Lua, the hot path of every request: bytes are decoded straight into Lua
//! values (no intermediate `serde_json::Value`), and Lua values are encoded with
//! mlua's serde support. `null` is `json.null`; decoded arrays carry mlua's array
//! metatable so an empty array encodes back as `[]`.

use std::fmt;

use mlua::{Lua, LuaSerdeExt, Table, Value};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Decodes JSON `bytes` into a Lua value.
pub fn decode(lua: &Lua, bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let array_metatable = lua.array_metatable();
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = LuaSeed { lua, array_metatable: &array_metatable }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// Encodes a Lua value as JSON.
pub fn encode(value: &Value) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(value)
}

/// The `json` global: `encode`, `decode`, `null`.
pub fn install(lua: &Lua) -> mlua::Result<()> {
    let json = lua.create_table()?;
    json.set(
        "encode",
        lua.create_function(|lua, value: Value| {
            let bytes = encode(&value).map_err(|err| mlua::Error::runtime(format!("json.encode: {err}")))?;
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

#[derive(Clone, Copy)]
struct LuaSeed<'a> {
    lua: &'a Lua,
    array_metatable: &'a Table,
}

impl<'de> DeserializeSeed<'de> for LuaSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

fn lua_error<E: serde::de::Error>(err: mlua::Error) -> E {
    E::custom(err)
}

impl<'de> Visitor<'de> for LuaSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Boolean(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map(Value::Integer).unwrap_or(Value::Number(v as f64)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.lua.create_string(v).map(Value::String).map_err(lua_error)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::NULL)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let table = self.lua.create_table_with_capacity(seq.size_hint().unwrap_or(0), 0).map_err(lua_error)?;
        let mut index = 1;
        while let Some(item) = seq.next_element_seed(self)? {
            table.raw_set(index, item).map_err(lua_error)?;
            index += 1;
        }
        table.set_metatable(Some(self.array_metatable.clone())).map_err(lua_error)?;
        Ok(Value::Table(table))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let table = self.lua.create_table_with_capacity(0, map.size_hint().unwrap_or(0)).map_err(lua_error)?;
        while let Some(key) = map.next_key_seed(self)? {
            let value = map.next_value_seed(self)?;
            table.raw_set(key, value).map_err(lua_error)?;
        }
        Ok(Value::Table(table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(text: &str) -> String {
        let lua = Lua::new();
        let value = decode(&lua, text.as_bytes()).unwrap();
        String::from_utf8(encode(&value).unwrap()).unwrap()
    }

    #[test]
    fn values_survive_a_roundtrip() {
        assert_eq!(roundtrip(r#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(roundtrip(r#"[1,2.5,"x",true,null]"#), r#"[1,2.5,"x",true,null]"#);
        assert_eq!(roundtrip(r#"{"empty":[]}"#), r#"{"empty":[]}"#);
        assert_eq!(roundtrip(r#""héllo""#), r#""héllo""#);
        assert_eq!(roundtrip("18446744073709551615"), "1.8446744073709552e+19");
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
        let value: Value = lua.load("return { list = {1, 2}, map = { k = 'v' } }").eval().unwrap();
        let text = String::from_utf8(encode(&value).unwrap()).unwrap();
        assert!(text.contains(r#""list":[1,2]"#) && text.contains(r#""map":{"k":"v"}"#), "{text}");
        let function: Value = lua.load("return { f = print }").eval().unwrap();
        assert!(encode(&function).is_err());
    }
}
