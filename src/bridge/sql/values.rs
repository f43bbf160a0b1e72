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
        "NUMERIC" => SqlValue::Text(decode::<sqlx::types::BigDecimal>(raw)?.to_plain_string()),
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
