//! Database pools for the `sql` bridge: PostgreSQL and SQLite through sqlx, one
//! small pool per VM (a connection's I/O belongs to the runtime that opened it),
//! and [`Session`]s that check a connection out for one call or one transaction.

mod session;
mod values;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

pub use session::{Executed, Rows, Session, SqlError};
pub use values::SqlValue;

/// Connections per VM and database: handlers past it wait for a free one.
const POOL_SIZE: u32 = 4;
/// How often PostgreSQL checks, during a statement, that the client is still
/// there: a statement whose handler was cancelled stops within this time.
const CLIENT_CHECK_INTERVAL: &str = "SET client_connection_check_interval = '1s'";
/// Pause between attempts to reach a database at start, growing to the maximum.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A parsed database URL, and how to show it without its password.
#[derive(Debug, Clone)]
pub enum DatabaseUrl {
    Postgres { options: PgConnectOptions, shown: String },
    Sqlite { options: SqliteConnectOptions, shown: String },
}

impl DatabaseUrl {
    /// Parses `url` given by `flag`; errors are meant for the user.
    pub fn parse(url: &str, flag: &str) -> Result<Self, String> {
        let url = url.trim();
        let shown = super::redact_url(url);
        let bad = |err: sqlx::Error| format!("invalid {flag} {shown:?}: {err}");
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url).map_err(bad)?;
            Ok(DatabaseUrl::Postgres { options, shown })
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url).map_err(bad)?.create_if_missing(true);
            Ok(DatabaseUrl::Sqlite { options, shown })
        } else {
            Err(format!("invalid {flag} {shown:?}: expected postgres://USER@HOST/DB or sqlite://PATH"))
        }
    }

    pub fn shown(&self) -> &str {
        match self {
            DatabaseUrl::Postgres { shown, .. } | DatabaseUrl::Sqlite { shown, .. } => shown,
        }
    }
}

#[derive(Clone)]
pub enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// One VM's pools by database name.
#[derive(Default)]
pub struct Pools(BTreeMap<String, Pool>);

impl Pools {
    /// Opens every database, retrying one that cannot be reached until
    /// `connect_timeout` (forever when `None`); other failures end at once.
    pub async fn open(
        databases: &BTreeMap<String, DatabaseUrl>,
        connect_timeout: Option<Duration>,
    ) -> Result<Self, String> {
        let mut pools = BTreeMap::new();
        for (name, url) in databases {
            pools.insert(name.clone(), open_one(name, url, connect_timeout).await?);
        }
        Ok(Pools(pools))
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.0.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

async fn open_one(name: &str, url: &DatabaseUrl, connect_timeout: Option<Duration>) -> Result<Pool, String> {
    let deadline = connect_timeout.map(|t| Instant::now() + t);
    let mut pause = RETRY_FIRST;
    loop {
        let attempt = match url {
            DatabaseUrl::Postgres { options, .. } => options.connect().await.map(drop),
            DatabaseUrl::Sqlite { options, .. } => options.connect().await.map(drop),
        };
        match attempt {
            Ok(()) => break,
            Err(err) if !unreachable(&err) => {
                return Err(format!("cannot open database {name} at {}: {err}", url.shown()));
            }
            Err(err) => {
                if deadline.is_some_and(|d| Instant::now() + pause > d) {
                    return Err(format!(
                        "cannot reach database {name} at {}: {err}; is the server running? (gave up after --connect-timeout)",
                        url.shown()
                    ));
                }
                tracing::warn!(database = name, url = url.shown(), error = %err, "cannot reach the database; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
    Ok(match url {
        DatabaseUrl::Postgres { options, .. } => Pool::Postgres(
            PgPoolOptions::new()
                .max_connections(POOL_SIZE)
                .acquire_timeout(Duration::from_secs(3600))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // PostgreSQL before 14 lacks the setting: then a cancelled
                        // statement runs to its end on the server.
                        let _ = sqlx::Executor::execute(conn, CLIENT_CHECK_INTERVAL).await;
                        Ok(())
                    })
                })
                .connect_lazy_with(options.clone()),
        ),
        DatabaseUrl::Sqlite { options, .. } => Pool::Sqlite(
            SqlitePoolOptions::new()
                .max_connections(POOL_SIZE)
                .acquire_timeout(Duration::from_secs(3600))
                .connect_lazy_with(options.clone()),
        ),
    })
}

/// Errors worth another try: the server is not (yet) there.
fn unreachable(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
        || matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("57P03"))
}
