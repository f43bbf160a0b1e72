//! Runs one test file: a Lua VM of its own (sandboxed, `require` next to the
//! file) with the `test` global, then each registered test in order. Responders
//! (`test.respond`) and HTTP routes (`test.http`) registered inside a test last
//! for that test; those at the file's top level for the whole file. Publishes
//! recorded by the workers are cleared before each test.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use async_nats::HeaderMap;
use bytes::Bytes;
use mlua::{Function, Lua, Table, Value};
use tokio::sync::mpsc;

use crate::kind::subject_matches;
use crate::lua_api::event::headers_table;
use crate::lua_api::{body_of, headers_of, json};
use crate::settings::LuaConfig;
use crate::settle::error_headers;
use crate::testkit::fakes::{Call, HttpRequest, HttpResponse};
use crate::testkit::report::{Failure, FileReport, TestResult};
use crate::testkit::worker::{TestWorker, WorkerHandle};
use crate::transport::{Response, TransportError};
use crate::worker::{sandbox, script_error_message};

const TEST_LIBRARY: &str = include_str!("test.lua");

/// An answer registered by `test.respond` or `test.http`.
struct Route {
    /// A NATS subject pattern, or an HTTP URL glob (`*` matches anything).
    pattern: String,
    method: Option<String>,
    answer: Value,
    /// Registered inside a test: removed when the test ends.
    scoped: bool,
}

struct Harness {
    dir: PathBuf,
    responders: RefCell<Vec<Route>>,
    routes: RefCell<Vec<Route>>,
    in_test: Cell<bool>,
    workers: RefCell<Vec<Rc<TestWorker>>>,
    calls: mpsc::UnboundedSender<Call>,
    /// `pcall(fn, ...)`, so raised tables come back as values.
    protect: Function,
}

/// Runs the tests of `path`, calling `progress` as each one ends. Must run inside
/// a `LocalSet`.
pub async fn run_file(path: &Path, display: &str, progress: &dyn Fn(&TestResult)) -> FileReport {
    let mut report = FileReport { path: display.to_string(), ..FileReport::default() };
    let (calls, mut incoming) = mpsc::unbounded_channel();
    let prepared = prepare(path, calls);
    let (lua, harness, tests) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            report.load_error = Some(plain_failure(script_error_message(&err)));
            return report;
        }
    };
    let answering = {
        let (lua, harness) = (lua.clone(), harness.clone());
        tokio::task::spawn_local(async move {
            while let Some(call) = incoming.recv().await {
                tokio::task::spawn_local(answer(lua.clone(), harness.clone(), call));
            }
        })
    };
    match load_tests(&lua, &harness, path, &tests).await {
        Err(failure) => report.load_error = Some(failure),
        Ok(tests) => {
            for (name, function) in tests {
                let result = run_test(&harness, name, function).await;
                progress(&result);
                report.results.push(result);
            }
        }
    }
    let workers: Vec<Rc<TestWorker>> = harness.workers.borrow_mut().drain(..).collect();
    for worker in workers {
        worker.shutdown().await;
    }
    answering.abort();
    report
}

fn prepare(path: &Path, calls: mpsc::UnboundedSender<Call>) -> mlua::Result<(Lua, Rc<Harness>, Table)> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let lua = sandbox::new_lua(&LuaConfig::default(), &dir, 1)?;
    json::install(&lua)?;
    let protect: Function = lua.load("return function(fn, ...) return pcall(fn, ...) end").set_name("=test").call(())?;
    let harness = Rc::new(Harness {
        dir,
        responders: Default::default(),
        routes: Default::default(),
        in_test: Cell::new(false),
        workers: Default::default(),
        calls,
        protect,
    });
    lua.set_app_data(harness.clone());
    let native = lua.create_table()?;
    native.set("worker", lua.create_async_function(worker)?)?;
    native.set("respond", lua.create_function(respond)?)?;
    native.set("http", lua.create_function(http_route)?)?;
    native.set("where", lua.create_function(|lua, ()| Ok(test_location(lua)))?)?;
    let (test, tests): (Table, Table) = lua.load(TEST_LIBRARY).set_name("=test").call(native)?;
    lua.globals().set("test", test)?;
    Ok((lua, harness, tests))
}

fn harness(lua: &Lua) -> Rc<Harness> {
    lua.app_data_ref::<Rc<Harness>>().map(|h| h.clone()).expect("the test VM gets its harness before running code")
}

/// Runs the file's top level, which registers the tests.
async fn load_tests(
    lua: &Lua,
    harness: &Harness,
    path: &Path,
    tests: &Table,
) -> Result<Vec<(String, Function)>, Failure> {
    let chunk = sandbox::load_file(lua, path, true).map_err(|err| plain_failure(script_error_message(&err)))?;
    let (ok, error): (bool, Value) =
        harness.protect.call_async(chunk).await.map_err(|err| plain_failure(script_error_message(&err)))?;
    if !ok {
        return Err(failure_of(error));
    }
    let mut list = Vec::new();
    for entry in tests.sequence_values::<Table>() {
        let entry = entry.map_err(|err| plain_failure(err.to_string()))?;
        let name: String = entry.get("name").map_err(|err| plain_failure(err.to_string()))?;
        let function: Function = entry.get("fn").map_err(|err| plain_failure(err.to_string()))?;
        list.push((name, function));
    }
    if list.is_empty() {
        return Err(plain_failure("no tests: register them with test(\"name\", function() ... end)".to_string()));
    }
    Ok(list)
}

async fn run_test(harness: &Harness, name: String, function: Function) -> TestResult {
    for worker in harness.workers.borrow().iter() {
        worker.fakes.clear_published();
    }
    harness.in_test.set(true);
    let started = Instant::now();
    let outcome = harness.protect.call_async::<(bool, Value)>(function).await;
    let time = started.elapsed();
    harness.in_test.set(false);
    harness.responders.borrow_mut().retain(|r| !r.scoped);
    harness.routes.borrow_mut().retain(|r| !r.scoped);
    let failure = match outcome {
        Ok((true, _)) => None,
        Ok((false, error)) => Some(failure_of(error)),
        Err(err) => Some(plain_failure(script_error_message(&err))),
    };
    TestResult { name, time, failure }
}

fn plain_failure(message: String) -> Failure {
    Failure { location: None, message, expected: None, actual: None }
}

/// What a test raised: an assertion (with `where`, `expected`, `actual`), a
/// string (Lua put `file:line:` in front), or an error table such as a
/// handler-style `{ code, message }`.
fn failure_of(error: Value) -> Failure {
    match error {
        Value::Table(table) => {
            let text = |key: &str| table.get::<Option<String>>(key).ok().flatten();
            match text("where") {
                Some(location) => Failure {
                    location: Some(location),
                    message: text("message").unwrap_or_else(|| "failed".to_string()),
                    expected: text("expected"),
                    actual: text("actual"),
                },
                None => {
                    let shown = match (text("code"), text("message")) {
                        (Some(code), Some(message)) => format!("error {code}: {message}"),
                        (None, Some(message)) => message,
                        _ => "raised a table".to_string(),
                    };
                    plain_failure(shown)
                }
            }
        }
        Value::Error(err) => plain_failure(script_error_message(&err)),
        other => plain_failure(other.to_string().unwrap_or_else(|_| format!("raised a {}", other.type_name()))),
    }
}

/// `file:line` of the innermost frame that runs code from a file (the test file
/// or a module it required), skipping the test library itself.
fn test_location(lua: &Lua) -> Option<String> {
    (1..64).find_map(|level| {
        lua.inspect_stack(level, |frame| {
            let source = frame.source();
            let file = source.source.filter(|s| s.starts_with('@'))?;
            Some(format!("{}:{}", &file[1..], frame.current_line()?))
        })
        .flatten()
    })
}

/// `test.worker(script, opts)`: `script` is found next to the test file.
async fn worker(lua: Lua, (script, opts): (String, Option<Table>)) -> mlua::Result<WorkerHandle> {
    let harness = harness(&lua);
    let path = harness.dir.join(&script);
    let worker = Rc::new(TestWorker::start(&lua, path, opts, harness.calls.clone()).await?);
    harness.workers.borrow_mut().push(worker.clone());
    Ok(WorkerHandle(worker))
}

/// `test.respond(subject, fn | value)`.
fn respond(lua: &Lua, (subject, answer): (String, Value)) -> mlua::Result<()> {
    if subject.is_empty() || subject.contains(char::is_whitespace) {
        return Err(mlua::Error::runtime(format!("test.respond: invalid subject {subject:?}")));
    }
    let harness = harness(lua);
    let scoped = harness.in_test.get();
    harness.responders.borrow_mut().push(Route { pattern: subject, method: None, answer, scoped });
    Ok(())
}

/// `test.http("POST https://host/path*", fn | value)`; the method is optional.
fn http_route(lua: &Lua, (pattern, answer): (String, Value)) -> mlua::Result<()> {
    let (method, url) = match pattern.split_once(' ') {
        Some((method, url)) => (Some(method.to_ascii_uppercase()), url.trim().to_string()),
        None => (None, pattern),
    };
    let harness = harness(lua);
    let scoped = harness.in_test.get();
    harness.routes.borrow_mut().push(Route { pattern: url, method, answer, scoped });
    Ok(())
}

/// The route registered last wins, so a test can override a file-wide answer.
fn find(routes: &RefCell<Vec<Route>>, matches: impl Fn(&Route) -> bool) -> Option<Value> {
    routes.borrow().iter().rev().find(|r| matches(r)).map(|r| r.answer.clone())
}

async fn answer(lua: Lua, harness: Rc<Harness>, call: Call) {
    match call {
        Call::Request { subject, headers, data, reply } => {
            let result = match find(&harness.responders, |r| subject_matches(&r.pattern, &subject)) {
                None => Err(TransportError::NoResponders(subject.clone())),
                Some(answer) => Ok(respond_with(&lua, &harness, answer, &subject, headers.as_ref(), &data).await),
            };
            let _ = reply.send(result);
        }
        Call::Http { request, reply } => {
            let route = find(&harness.routes, |r| {
                r.method.as_ref().is_none_or(|m| *m == request.method) && glob(&r.pattern, &request.url)
            });
            let result = match route {
                None => Err((502, "no test.http route".to_string())),
                Some(answer) => http_answer(&lua, &harness, answer, &request).await,
            };
            let _ = reply.send(result);
        }
    }
}

/// Calls a responder (or takes its fixed value) and turns what it did into a reply:
/// a returned value as the body (strings raw, tables JSON) with optional headers
/// as a second value; a raised `{ code, message }` or string as an error reply.
async fn respond_with(
    lua: &Lua,
    harness: &Harness,
    answer: Value,
    subject: &str,
    headers: Option<&HeaderMap>,
    data: &Bytes,
) -> Response {
    let reply = async {
        let (ok, value, extra) = match answer {
            Value::Function(function) => {
                let request = lua.create_table()?;
                request.set("subject", subject)?;
                body_into(lua, &request, headers, data)?;
                harness.protect.call_async::<(bool, Value, Value)>((function, request)).await?
            }
            value => (true, value, Value::Nil),
        };
        if !ok {
            let (code, message) = error_code(&value);
            return Ok(Response { data: Bytes::new(), headers: Some(error_headers(code, &message)) });
        }
        let headers = match extra {
            Value::Table(table) => Some(headers_of(&table)?),
            _ => None,
        };
        Ok::<_, mlua::Error>(Response { data: body_of(lua, &value)?, headers })
    };
    reply.await.unwrap_or_else(|err: mlua::Error| Response {
        data: Bytes::new(),
        headers: Some(error_headers(500, &format!("test.respond({subject:?}): {err}"))),
    })
}

async fn http_answer(
    lua: &Lua,
    harness: &Harness,
    answer: Value,
    request: &HttpRequest,
) -> Result<HttpResponse, (u16, String)> {
    let route = async {
        let (ok, value) = match answer {
            Value::Function(function) => {
                let table = lua.create_table()?;
                table.set("method", request.method.as_str())?;
                table.set("url", request.url.as_str())?;
                body_into(lua, &table, Some(&request.headers), &request.body)?;
                table.set("body", lua.create_string(&request.body)?)?;
                harness.protect.call_async::<(bool, Value)>((function, table)).await?
            }
            value => (true, value),
        };
        if !ok {
            return Ok(Err(error_code(&value)));
        }
        let response = match &value {
            Value::Table(table) if table.contains_key("status")? => {
                let status: u16 = table.get("status")?;
                let headers = table.get::<Option<Table>>("headers")?.map(|h| headers_of(&h)).transpose()?;
                let body = body_of(lua, &table.get::<Value>("body")?)?;
                HttpResponse { status, headers: headers.unwrap_or_default(), body }
            }
            other => HttpResponse { status: 200, headers: HeaderMap::new(), body: body_of(lua, other)? },
        };
        Ok::<_, mlua::Error>(Ok(response))
    };
    route.await.unwrap_or_else(|err| Err((502, format!("test.http route for {}: {err}", request.url))))
}

/// `data`, `payload` (when JSON) and `headers` of a request table.
fn body_into(lua: &Lua, table: &Table, headers: Option<&HeaderMap>, data: &Bytes) -> mlua::Result<()> {
    table.set("data", lua.create_string(data)?)?;
    if !data.is_empty()
        && let Ok(payload) = json::decode(lua, data)
    {
        table.set("payload", payload.clone())?;
        table.set("json", payload)?;
    }
    table.set("headers", headers_table(lua, headers)?)
}

fn error_code(value: &Value) -> (u16, String) {
    match value {
        Value::Table(table) => {
            let code = table.get::<Option<u16>>("code").ok().flatten().unwrap_or(500);
            let message = table.get::<Option<String>>("message").ok().flatten().unwrap_or_else(|| "error".to_string());
            (code, message)
        }
        Value::Error(err) => (500, script_error_message(err)),
        other => (500, other.to_string().unwrap_or_else(|_| "error".to_string())),
    }
}

/// `*` matches any run of characters; everything else literally.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            let Some(rest) = text.strip_prefix(head) else { return false };
            (0..=rest.len()).filter(|&i| rest.is_char_boundary(i)).any(|i| glob(tail, &rest[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_matches_stars_only() {
        assert!(glob("https://api.test/*", "https://api.test/orders/1"));
        assert!(glob("*/hook", "https://x/hook"));
        assert!(!glob("https://api.test/a", "https://api.test/ab"));
        assert!(glob("a*c*e", "abcde"));
    }
}
