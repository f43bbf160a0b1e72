//! A connection checked out of a pool for one call or one transaction. Dropped
//! mid-statement or inside a transaction (the handler's deadline passed or
//! shutdown cancelled it), it closes the connection instead of returning it: the
//! server then abandons the statement and rolls the transaction back, and the pool
//! never hands out a connection in an unknown state.

use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Column, Postgres, Row, Sqlite};

use super::Pool;
use super::values::{self, SqlValue};

/// Rows of a query: column names in order, then values per row.
#[derive(Debug, Default)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<SqlValue>>,
}

#[derive(Debug)]
pub struct Executed {
    pub affected: u64,
    /// SQLite's rowid of the last insert; PostgreSQL has none (use `RETURNING`).
    pub last_id: Option<i64>,
}

/// A failed statement or connection, in words for the handler.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SqlError(pub String);

impl From<sqlx::Error> for SqlError {
    fn from(err: sqlx::Error) -> Self {
        SqlError(match &err {
            sqlx::Error::Database(db) => match db.code() {
                Some(code) => format!("{} (SQLSTATE {code})", db.message()),
                None => db.message().to_string(),
            },
            other => other.to_string(),
        })
    }
}

enum Connection {
    Postgres(PoolConnection<Postgres>),
    Sqlite(PoolConnection<Sqlite>),
}

pub struct Session {
    connection: Connection,
    busy: bool,
    in_transaction: bool,
}

impl Session {
    pub async fn acquire(pool: &Pool) -> Result<Session, SqlError> {
        let connection = match pool {
            Pool::Postgres(pool) => Connection::Postgres(pool.acquire().await?),
            Pool::Sqlite(pool) => Connection::Sqlite(pool.acquire().await?),
        };
        Ok(Session { connection, busy: false, in_transaction: false })
    }

    pub async fn query(&mut self, statement: &str, params: Vec<SqlValue>) -> Result<Rows, SqlError> {
        self.busy = true;
        let sql = AssertSqlSafe(statement.to_string());
        let rows = match &mut self.connection {
            Connection::Postgres(conn) => {
                let query = params.into_iter().fold(sqlx::query(sql), values::bind_postgres);
                let rows = query.fetch_all(&mut **conn).await?;
                collect(&rows, values::from_postgres)?
            }
            Connection::Sqlite(conn) => {
                let query = params.into_iter().fold(sqlx::query(sql), values::bind_sqlite);
                let rows = query.fetch_all(&mut **conn).await?;
                collect(&rows, values::from_sqlite)?
            }
        };
        self.busy = false;
        Ok(rows)
    }

    pub async fn exec(&mut self, statement: &str, params: Vec<SqlValue>) -> Result<Executed, SqlError> {
        self.busy = true;
        let sql = AssertSqlSafe(statement.to_string());
        let executed = match &mut self.connection {
            Connection::Postgres(conn) => {
                let query = params.into_iter().fold(sqlx::query(sql), values::bind_postgres);
                let done = query.execute(&mut **conn).await?;
                Executed { affected: done.rows_affected(), last_id: None }
            }
            Connection::Sqlite(conn) => {
                let query = params.into_iter().fold(sqlx::query(sql), values::bind_sqlite);
                let done = query.execute(&mut **conn).await?;
                Executed { affected: done.rows_affected(), last_id: Some(done.last_insert_rowid()) }
            }
        };
        self.busy = false;
        Ok(executed)
    }

    pub async fn begin(&mut self) -> Result<(), SqlError> {
        self.in_transaction = true;
        self.exec("BEGIN", Vec::new()).await.map(drop)
    }

    pub async fn commit(&mut self) -> Result<(), SqlError> {
        self.exec("COMMIT", Vec::new()).await?;
        self.in_transaction = false;
        Ok(())
    }

    pub async fn rollback(&mut self) -> Result<(), SqlError> {
        self.exec("ROLLBACK", Vec::new()).await?;
        self.in_transaction = false;
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.busy || self.in_transaction {
            match &mut self.connection {
                Connection::Postgres(conn) => conn.close_on_drop(),
                Connection::Sqlite(conn) => conn.close_on_drop(),
            }
        }
    }
}

fn collect<R: Row>(rows: &[R], decode: fn(&R, usize) -> Result<SqlValue, String>) -> Result<Rows, SqlError> {
    let Some(first) = rows.first() else { return Ok(Rows::default()) };
    let columns: Vec<String> = first.columns().iter().map(|c| c.name().to_string()).collect();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let values: Result<Vec<SqlValue>, String> = (0..columns.len()).map(|i| decode(row, i)).collect();
        out.push(values.map_err(SqlError)?);
    }
    Ok(Rows { columns, rows: out })
}
