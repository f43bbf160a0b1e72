//! SQL values in and out: parameters bound with fixed types, result columns
//! mapped by their database type. The README's type table describes this file.

use sqlx::postgres::{PgArgumentBuffer, PgRow, PgTypeInfo, PgValueRef, Postgres};
use sqlx::sqlite::{SqliteRow, SqliteValueRef};
use sqlx::types::Json;
use sqlx::{Column, Decode, Encode, Row, TypeInfo, ValueRef};

/// A value crossing between Lua and a database.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
    Json(serde_json::Value),
}

/// A NULL parameter whose type PostgreSQL infers from where it is used, so it
/// fits a column of any type (a typed NULL would need a cast).
pub struct UntypedNull;

impl sqlx::Type<Postgres> for UntypedNull {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl Encode<'_, Postgres> for UntypedNull {
    fn encode_by_ref(&self, _: &mut PgArgumentBuffer) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}

pub fn bind_postgres<'q>(
    query: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    value: SqlValue,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    match value {
        SqlValue::Null => query.bind(UntypedNull),
        SqlValue::Int(n) => query.bind(n),
        SqlValue::Float(n) => query.bind(n),
        SqlValue::Bool(b) => query.bind(b),
        SqlValue::Text(s) => query.bind(s),
        SqlValue::Bytes(b) => query.bind(b),
        SqlValue::Json(j) => query.bind(Json(j)),
    }
}

pub fn bind_sqlite<'q>(
    query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    value: SqlValue,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    match value {
        SqlValue::Null => query.bind(None::<i64>),
        SqlValue::Int(n) => query.bind(n),
        SqlValue::Float(n) => query.bind(n),
        SqlValue::Bool(b) => query.bind(b),
        SqlValue::Text(s) => query.bind(s),
        SqlValue::Bytes(b) => query.bind(b),
        SqlValue::Json(j) => query.bind(j.to_string()),
    }
}

/// One PostgreSQL column value.
pub fn from_postgres(row: &PgRow, index: usize) -> Result<SqlValue, String> {
    let raw = row.try_get_raw(index).map_err(|e| e.to_string())?;
    if raw.is_null() {
        return Ok(SqlValue::Null);
    }
    let type_name = raw.type_info().name().to_string();
    let value = match type_name.as_str() {
        "INT2" => SqlValue::Int(decode::<i16>(raw)?.into()),
        "INT4" => SqlValue::Int(decode::<i32>(raw)?.into()),
        "INT8" => SqlValue::Int(decode::<i64>(raw)?),
        "OID" => SqlValue::Int(decode::<sqlx::postgres::types::Oid>(raw)?.0.into()),
        "FLOAT4" => SqlValue::Float(decode::<f32>(raw)?.into()),
        "FLOAT8" => SqlValue::Float(decode::<f64>(raw)?),
        "BOOL" => SqlValue::Bool(decode::<bool>(raw)?),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" | "CITEXT" | "UNKNOWN" => {
            SqlValue::Text(decode::<String>(raw)?)
        }
        "BYTEA" => SqlValue::Bytes(decode::<Vec<u8>>(raw)?),
        "JSON" | "JSONB" => SqlValue::Json(decode::<Json<serde_json::Value>>(raw)?.0),
        "NUMERIC" => SqlValue::Text(numeric_text(raw.as_bytes().map_err(|e| e.to_string())?)?),
        "TIMESTAMPTZ" => SqlValue::Text(
            decode::<sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>>(raw)?
                .format("%Y-%m-%dT%H:%M:%S%.fZ")
                .to_string(),
        ),
        "TIMESTAMP" => SqlValue::Text(
            decode::<sqlx::types::chrono::NaiveDateTime>(raw)?.format("%Y-%m-%dT%H:%M:%S%.f").to_string(),
        ),
        "DATE" => SqlValue::Text(decode::<sqlx::types::chrono::NaiveDate>(raw)?.to_string()),
        "TIME" => SqlValue::Text(decode::<sqlx::types::chrono::NaiveTime>(raw)?.to_string()),
        "UUID" => SqlValue::Text(uuid_text(raw.as_bytes().map_err(|e| e.to_string())?)?),
        other => {
            let column = row.columns()[index].name();
            return Err(format!(
                "column {column:?} has type {other}, which sql cannot read; cast it in the query, e.g. {column}::text"
            ));
        }
    };
    Ok(value)
}

fn decode<'r, T: Decode<'r, Postgres>>(raw: PgValueRef<'r>) -> Result<T, String> {
    T::decode(raw).map_err(|e| e.to_string())
}

/// PostgreSQL's binary `numeric` written as PostgreSQL writes it in text: all
/// digits, exactly `dscale` of them after the point.
fn numeric_text(bytes: &[u8]) -> Result<String, String> {
    let word = |i: usize| -> Result<i16, String> {
        bytes
            .get(i * 2..i * 2 + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or("a truncated numeric value".to_string())
    };
    let (count, weight, sign, scale) = (word(0)?, word(1)?, word(2)? as u16, word(3)? as u16);
    match sign {
        0xC000 => return Ok("NaN".to_string()),
        0xD000 => return Ok("Infinity".to_string()),
        0xF000 => return Ok("-Infinity".to_string()),
        _ => {}
    }
    let digits: Vec<i16> = (0..count.max(0) as usize).map(|i| word(4 + i)).collect::<Result<_, _>>()?;
    let group = |position: i32| -> i16 {
        // digit `k` has weight `weight - k`
        usize::try_from(i32::from(weight) - position).ok().and_then(|k| digits.get(k).copied()).unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        text.push_str(&group(i32::from(weight)).to_string());
        for position in (0..i32::from(weight)).rev() {
            text.push_str(&format!("{:04}", group(position)));
        }
    }
    if scale > 0 {
        let mut fraction = String::new();
        let mut position = -1;
        while fraction.len() < usize::from(scale) {
            fraction.push_str(&format!("{:04}", group(position)));
            position -= 1;
        }
        fraction.truncate(usize::from(scale));
        text.push('.');
        text.push_str(&fraction);
    }
    Ok(text)
}

fn uuid_text(bytes: &[u8]) -> Result<String, String> {
    if bytes.len() != 16 {
        return Err("a uuid value is not 16 bytes".to_string());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32]))
}

/// One SQLite column value: by the stored value's type, with columns declared
/// BOOLEAN read as booleans.
pub fn from_sqlite(row: &SqliteRow, index: usize) -> Result<SqlValue, String> {
    let raw = row.try_get_raw(index).map_err(|e| e.to_string())?;
    if raw.is_null() {
        return Ok(SqlValue::Null);
    }
    let declared = row.columns()[index].type_info().name().to_ascii_uppercase();
    let stored = raw.type_info().name().to_string();
    let value = match stored.as_str() {
        "INTEGER" | "INT8" | "BOOLEAN" if declared == "BOOLEAN" => SqlValue::Bool(decode_sqlite::<i64>(raw)? != 0),
        "INTEGER" | "INT8" | "BOOLEAN" => SqlValue::Int(decode_sqlite::<i64>(raw)?),
        "REAL" => SqlValue::Float(decode_sqlite::<f64>(raw)?),
        "BLOB" => SqlValue::Bytes(decode_sqlite::<Vec<u8>>(raw)?),
        _ => SqlValue::Text(decode_sqlite::<String>(raw)?),
    };
    Ok(value)
}

fn decode_sqlite<'r, T: Decode<'r, sqlx::Sqlite>>(raw: SqliteValueRef<'r>) -> Result<T, String> {
    T::decode(raw).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::numeric_text;

    fn numeric(count: i16, weight: i16, sign: u16, scale: u16, digits: &[i16]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [count, weight, sign as i16, scale as i16].iter().chain(digits) {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        bytes
    }

    #[test]
    fn numeric_text_keeps_the_declared_scale() {
        assert_eq!(numeric_text(&numeric(3, 1, 0, 5, &[1, 2345, 6789])).unwrap(), "12345.67890");
        assert_eq!(numeric_text(&numeric(1, -1, 0x4000, 2, &[500])).unwrap(), "-0.05");
        assert_eq!(numeric_text(&numeric(1, 2, 0, 0, &[7])).unwrap(), "700000000");
        assert_eq!(numeric_text(&numeric(0, 0, 0, 3, &[])).unwrap(), "0.000");
        assert_eq!(numeric_text(&numeric(0, 0, 0xC000, 0, &[])).unwrap(), "NaN");
    }
}
