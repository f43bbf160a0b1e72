//! The `sql` bridge against a private PostgreSQL and a SQLite file: queries,
//! exec, the type table, NULL, transactions committed and rolled back (by an
//! error and by a timeout), a statement cancelled by the deadline, bad settings.

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::time::{Duration, Instant};

use common::*;
use postgres::Postgres;
use serde_json::{Value, json};

const APP: &str = r#"
bus.subscribe("sql.>")
local function db(p) if p.db then return sql.db(p.db) end return sql end
bus.on("sql.query", function(ev) return { rows = db(ev.payload).query(ev.payload.sql, ev.payload.params) } end)
bus.on("sql.exec", function(ev) return db(ev.payload).exec(ev.payload.sql, ev.payload.params) end)
bus.on("sql.failing", function(ev)
  local ok, err = pcall(sql.query, ev.payload.sql)
  return { ok = ok, code = err.code, message = err.message }
end)
bus.on("sql.bytes", function(ev)
  -- not UTF-8: bound as bytea
  local raw = string.char(255, 0, 1)
  return sql.query("select octet_length($1) as n, $1 = '\\xff0001'::bytea as same", { raw })[1]
end)
bus.on("sql.types", function(ev)
  local r = sql.query(ev.payload.sql)[1]
  local by = {}
  for i = 1, #r.by do by[i] = string.byte(r.by, i) end
  r.by = by
  r.nul_is_null = r.nul == sql.null
  return r
end)
bus.on("sql.commit", function(ev)
  return sql.transaction(function(tx)
    tx.exec("insert into items(name) values ($1)", { ev.payload.name })
    local rows = tx.query("select count(*) as n from items where name = $1", { ev.payload.name })
    return { inside = rows[1].n }
  end)
end)
bus.on("sql.raise", function(ev)
  local ok, err = pcall(sql.transaction, function(tx)
    tx.exec("insert into items(name) values ($1)", { ev.payload.name })
    error({ code = 409, message = "conflict" })
  end)
  return { ok = ok, code = err.code, message = err.message }
end)
bus.on("sql.stall", function(ev)
  sql.transaction(function(tx)
    tx.exec("insert into items(name) values ($1)", { ev.payload.name })
    time.sleep(60)
  end)
end)
"#;

type Setup = Running;

async fn start(args: &[&str]) -> Setup {
    start_app(APP, args).await
}

async fn call(setup: &Setup, subject: &str, payload: Value) -> Value {
    let reply = request(&setup.client, subject, &payload.to_string()).await;
    assert_eq!(error_of(&reply), None, "worker log:\n{}", setup.worker.stderr.text());
    json(&reply)
}

async fn rows(setup: &Setup, sql: &str, params: Value) -> Value {
    call(setup, "sql.query", json!({ "sql": sql, "params": params })).await["rows"].clone()
}

async fn count(setup: &Setup, name: &str) -> i64 {
    let found = rows(setup, "select count(*) as n from items where name = $1", json!([name])).await;
    found[0]["n"].as_i64().expect("a count")
}

async fn postgres_app(extra: &[&str]) -> (Postgres, Setup) {
    let pg = Postgres::start(free_port);
    let url = pg.url();
    let mut args = vec!["--sql-url", url.as_str()];
    args.extend_from_slice(extra);
    let setup = start(&args).await;
    call(&setup, "sql.exec", json!({ "sql": "create table items(id serial primary key, name text not null)" })).await;
    (pg, setup)
}

#[tokio::test]
async fn postgres_query_exec_and_bound_parameters() {
    let (_pg, setup) = postgres_app(&[]).await;
    let done = call(
        &setup,
        "sql.exec",
        json!({ "sql": "insert into items(name) values ($1), ($2)", "params": ["a", "it's; drop table items"] }),
    )
    .await;
    assert_eq!(done["affected"], 2);
    let found = rows(&setup, "select name from items order by id", json!([])).await;
    assert_eq!(found, json!([{ "name": "a" }, { "name": "it's; drop table items" }]));

    let bound = rows(
        &setup,
        "select $1::int8 + 1 as a, $2::float8 * 2 as b, $3 || '!' as c, not $4 as d, $5::jsonb -> 'k' as e, $6::int4 is null as f",
        json!([41, 1.5, "hi", true, { "k": [1, 2] }, null]),
    )
    .await;
    assert_eq!(bound, json!([{ "a": 42, "b": 3.0, "c": "hi!", "d": false, "e": [1, 2], "f": true }]));

    // NULL binds to a column of any type without a cast.
    call(&setup, "sql.exec", json!({ "sql": "create table maybe(n int4, t timestamptz)" })).await;
    call(&setup, "sql.exec", json!({ "sql": "insert into maybe values ($1, $2)", "params": [null, null] })).await;

    let failed = call(&setup, "sql.failing", json!({ "sql": "select * from nowhere" })).await;
    assert_eq!(failed["ok"], false);
    assert_eq!(failed["code"], 500);
    assert!(failed["message"].as_str().unwrap().contains("nowhere"), "{failed}");
}

#[tokio::test]
async fn postgres_types_map_as_the_readme_says() {
    let (_pg, setup) = postgres_app(&[]).await;
    let sql = r#"select 1::int2 as i2, 2::int4 as i4, 9007199254740993::int8 as i8, 1.5::float4 as f4,
        2.25::float8 as f8, 'txt'::text as t, 'vc'::varchar(5) as vc, true as b, '\x0001ff'::bytea as by,
        '{"a":[1,2]}'::json as j, '{"b":true}'::jsonb as jb, 12345.678901234567890123::numeric as n,
        '2024-01-02 03:04:05.123456+00'::timestamptz as tz, '2024-01-02 03:04:05'::timestamp as ts,
        '2024-01-02'::date as d, '03:04:05'::time as tm, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u,
        null::int4 as nul"#;
    let row = call(&setup, "sql.types", json!({ "sql": sql })).await;
    let expected = json!({
        "i2": 1, "i4": 2, "i8": 9007199254740993i64, "f4": 1.5, "f8": 2.25, "t": "txt", "vc": "vc", "b": true,
        "by": [0, 1, 255], "j": { "a": [1, 2] }, "jb": { "b": true }, "n": "12345.678901234567890123",
        "tz": "2024-01-02T03:04:05.123456Z", "ts": "2024-01-02T03:04:05", "d": "2024-01-02", "tm": "03:04:05",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "nul_is_null": true,
    });
    for (key, value) in expected.as_object().unwrap() {
        assert_eq!(&row[key], value, "column {key}: {row}");
    }

    let unsupported = call(&setup, "sql.failing", json!({ "sql": "select interval '1 day' as span" })).await;
    assert!(unsupported["message"].as_str().unwrap().contains("span::text"), "{unsupported}");
}

#[tokio::test]
async fn transactions_commit_and_roll_back() {
    let (_pg, setup) = postgres_app(&["--handler-timeout", "1s"]).await;
    let committed = call(&setup, "sql.commit", json!({ "name": "kept" })).await;
    assert_eq!(committed["inside"], 1);
    assert_eq!(count(&setup, "kept").await, 1);

    let raised = call(&setup, "sql.raise", json!({ "name": "raised" })).await;
    assert_eq!(raised["ok"], false);
    assert_eq!(raised["code"], 409, "the handler's error comes through unchanged: {raised}");
    assert_eq!(count(&setup, "raised").await, 0);

    let reply = request(&setup.client, "sql.stall", &json!({ "name": "stalled" }).to_string()).await;
    assert_eq!(error_of(&reply).map(|(code, _)| code), Some(504));
    assert_eq!(count(&setup, "stalled").await, 0);
    // The abandoned transaction's connection is closed, not left idle in transaction.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let open =
            rows(&setup, "select count(*) as n from pg_stat_activity where state = 'idle in transaction'", json!([]))
                .await;
        if open[0]["n"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "a transaction stayed open: {open}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_deadline_cancels_a_running_statement() {
    let (_pg, setup) = postgres_app(&["--handler-timeout", "500ms"]).await;
    let payload = json!({ "sql": "select pg_sleep(60) as slept" }).to_string();
    let reply = request(&setup.client, "sql.query", &payload).await;
    assert_eq!(error_of(&reply).map(|(code, _)| code), Some(504));
    // The server notices the closed connection (client_connection_check_interval
    // is 1 s) and stops the statement; generous bound for a loaded machine.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let sleeping = rows(
            &setup,
            "select count(*) as n from pg_stat_activity where query like '%pg_sleep(60)%' and pid <> pg_backend_pid()",
            json!([]),
        )
        .await;
        if sleeping[0]["n"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the statement kept running: {sleeping}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sqlite_named_database() {
    let scripts = Scripts::new();
    let url = format!("lite=sqlite://{}", scripts.path().join("app.db").display());
    let setup = start(&["--sql", &url]).await;
    let create = "create table notes(id integer primary key, body text, done boolean, score real, raw blob)";
    call(&setup, "sql.exec", json!({ "db": "lite", "sql": create })).await;
    let insert = "insert into notes(body, done, score, raw) values (?, ?, ?, ?)";
    let done =
        call(&setup, "sql.exec", json!({ "db": "lite", "sql": insert, "params": ["first", true, 0.5, null] })).await;
    assert_eq!(done["affected"], 1);
    assert_eq!(done["last_id"], 1);
    let found =
        call(&setup, "sql.query", json!({ "db": "lite", "sql": "select * from notes where id = $1", "params": [1] }))
            .await;
    assert_eq!(found["rows"], json!([{ "id": 1, "body": "first", "done": true, "score": 0.5, "raw": null }]));

    let missing = request(&setup.client, "sql.query", &json!({ "sql": "select 1" }).to_string()).await;
    let (_, message) = error_of(&missing).expect("no default database");
    assert!(message.contains("--sql-url"), "{message}");
}

#[test]
fn bad_database_settings_fail_at_start() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", "bus.subscribe('x')");
    let script = script.to_str().unwrap();
    let server = server();
    let url = server.url();

    let (code, _, stderr) =
        run_command(&["run", script, "--nats-url", &url, "--sql-url", "mysql://user:pw@host/db"], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--sql-url") && !stderr.contains("pw@"), "{stderr}");

    let unreachable = format!("postgres://postgres:pw@127.0.0.1:{}/db", free_port());
    let args = ["run", script, "--nats-url", &url, "--sql-url", &unreachable, "--connect-timeout", "1s"];
    let started = Instant::now();
    let (code, _, stderr) = run_command(&args, None);
    assert_eq!(code, 1, "{stderr}");
    assert_gave_up_soon(started);
    assert!(stderr.contains("cannot reach database") && !stderr.contains("pw@"), "{stderr}");
}

#[test]
fn check_refuses_sql_naming_the_bridge() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", "sql.query('select 1')");
    let (code, _, stderr) = run_command(&["check", script.to_str().unwrap()], None);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("sql.query is not available"), "{stderr}");
}

#[tokio::test]
async fn the_orders_example_stores_an_order_in_one_transaction() {
    let server = server();
    let scripts = Scripts::new();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/lua/examples/orders_sql.lua");
    let url = format!("sqlite://{}", scripts.path().join("orders.db").display());
    let worker = Worker::run(&server, std::path::Path::new(example), &["--workers", "1", "--sql-url", &url]);
    let client = client(&server).await;
    let order = json!({ "customer": "ada", "lines": [{ "sku": "tea", "qty": 2 }, { "sku": "cup", "qty": 1 }] });
    let reply = request(&client, "orders.place", &order.to_string()).await;
    assert_eq!(error_of(&reply), None, "{}", worker.stderr.text());
    assert_eq!(json(&reply)["id"], 1);
    let bad = json!({ "customer": "bob", "lines": [{ "sku": "tea", "qty": 2 }, { "sku": "cup", "qty": 0 }] });
    let reply = request(&client, "orders.place", &bad.to_string()).await;
    assert_eq!(error_of(&reply).map(|(code, _)| code), Some(400));
    let next = request(&client, "orders.place", &order.to_string()).await;
    assert_eq!(json(&next)["id"], 2, "the rolled-back order left no row behind");
}

#[test]
fn an_unreachable_database_is_retried_until_a_signal_stops_the_worker() {
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", "bus.subscribe('x')");
    let server = server();
    let url = server.url();
    let unreachable = format!("postgres://postgres@127.0.0.1:{}/db", free_port());
    let mut worker = Worker::spawn(&["run", script.to_str().unwrap(), "--nats-url", &url, "--sql-url", &unreachable]);
    assert!(worker.stderr.wait_for("cannot reach the database; retrying", PATIENCE), "{}", worker.stderr.text());
    worker.terminate();
    let status = worker.wait_exit(PATIENCE).expect("the worker exits on SIGTERM while waiting for the database");
    assert_eq!(status.code(), Some(0), "{}", worker.stderr.text());
}

#[tokio::test]
async fn sqlstate_bytea_and_the_pool_bound() {
    let (_pg, setup) = postgres_app(&["--concurrency", "8"]).await;
    let failed = call(&setup, "sql.failing", json!({ "sql": "select * from nowhere" })).await;
    assert!(failed["message"].as_str().unwrap().contains("42P01"), "the SQLSTATE: {failed}");

    let bytes = call(&setup, "sql.bytes", json!({})).await;
    assert_eq!((bytes["n"].as_i64(), bytes["same"].as_bool()), (Some(3), Some(true)), "{bytes}");

    // Eight statements at once on one VM: each counts the ones running beside it.
    let sql = "select (select count(*) from pg_stat_activity where query like 'select (select count(*)%' \
               and state = 'active') as running, pg_sleep(0.5)::text as slept";
    let calls = (0..8).map(|_| rows(&setup, sql, json!([])));
    let running: Vec<i64> =
        futures::future::join_all(calls).await.iter().map(|r| r[0]["running"].as_i64().unwrap()).collect();
    assert!(running.iter().all(|&n| n <= 4), "more than 4 connections of one VM at once: {running:?}");
    assert_eq!(running.iter().max(), Some(&4), "{running:?}");
}

#[test]
fn a_missing_database_exits_1_at_once() {
    let pg = Postgres::start(free_port);
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", "bus.subscribe('x')");
    let server = server();
    let url = server.url();
    let missing = pg.url().replace("/postgres", "/no_such_db");
    // No --connect-timeout: only a failure that is not retried ends the worker.
    let started = Instant::now();
    let (code, _, stderr) =
        run_command(&["run", script.to_str().unwrap(), "--nats-url", &url, "--sql-url", &missing], None);
    assert_eq!(code, 1, "{stderr}");
    assert_gave_up_soon(started);
    assert!(stderr.contains("no_such_db"), "the error names the database: {stderr}");
}

#[test]
fn a_wrong_database_password_exits_1_at_once_without_the_password() {
    let pg = Postgres::start_with(free_port, Some("right-pw-3c"));
    let scripts = Scripts::new();
    let script = scripts.write("app.lua", "bus.subscribe('x')");
    let server = server();
    let url = server.url();
    let wrong = pg.url().replace("postgres@", "postgres:wrong-pw-8d@");
    // No --connect-timeout: only a failure that is not retried ends the worker.
    let started = Instant::now();
    let (code, _, stderr) =
        run_command(&["run", script.to_str().unwrap(), "--nats-url", &url, "--sql-url", &wrong], None);
    assert_eq!(code, 1, "{stderr}");
    assert_gave_up_soon(started);
    assert!(stderr.contains("password"), "the error says why: {stderr}");
    assert!(!stderr.contains("wrong-pw-8d"), "{stderr}");
}
