//! The bridges a worker under test sees: NATS publishes recorded and requests
//! answered by the test's responders, `kv` in memory, `http` answered by the
//! test's routes, `time` on a virtual clock and `env` from the test's table.
//!
//! The worker runs on its own VM thread, the test file on another; whatever the
//! test answers with (responders, HTTP routes) is asked for over [`Call`]s, and
//! whatever the test reads back (publishes, KV entries) sits behind a lock here.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::future::{BoxFuture, LocalBoxFuture};
use mlua::{Lua, Table, Value};
use tokio::sync::{mpsc, oneshot};

use crate::bridge::http_exchange::{HttpExchange, HttpFailure, HttpResponse as ExchangedResponse, too_large};
use crate::lua_api::{body_of, duration_of};
use crate::settings::Prelude;
use crate::transport::{Response, Transport, TransportError};

/// A message a handler published (or a dead letter the worker published).
#[derive(Debug, Clone)]
pub struct Published {
    pub subject: String,
    pub headers: Option<HeaderMap>,
    pub data: Bytes,
}

/// An outgoing HTTP request made by a handler.
#[derive(Debug)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What a `test.http` route answered.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A question from the worker's thread to the test's thread.
pub enum Call {
    Request {
        subject: String,
        headers: Option<HeaderMap>,
        data: Bytes,
        reply: oneshot::Sender<Result<Response, TransportError>>,
    },
    Http {
        request: HttpRequest,
        /// An error is `(code, message)`, raised in the handler as `{ code, message }`.
        reply: oneshot::Sender<Result<HttpResponse, (u16, String)>>,
    },
}

/// Time as the worker under test sees it: `time.sleep` moves it forward at once,
/// so a test of a ten-minute backoff takes no time.
pub struct Clock {
    start: f64,
    elapsed_nanos: AtomicU64,
}

impl Clock {
    pub fn new(start: Option<f64>) -> Self {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Clock { start: start.unwrap_or(now), elapsed_nanos: AtomicU64::new(0) }
    }

    pub fn now(&self) -> f64 {
        self.start + self.elapsed_nanos.load(Ordering::SeqCst) as f64 / 1e9
    }

    /// How far the clock has moved since the worker started.
    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.elapsed_nanos.load(Ordering::SeqCst))
    }

    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.elapsed_nanos.fetch_add(nanos, Ordering::SeqCst);
    }
}

/// One in-memory KV bucket: revisions count up per bucket, as in JetStream.
#[derive(Default)]
pub struct Bucket {
    last_revision: u64,
    entries: BTreeMap<String, (Bytes, u64)>,
}

impl Bucket {
    fn write(&mut self, key: &str, value: Bytes) -> u64 {
        self.last_revision += 1;
        self.entries.insert(key.to_string(), (value, self.last_revision));
        self.last_revision
    }

    /// The value and revision stored under `key`.
    pub fn get(&self, key: &str) -> Option<&(Bytes, u64)> {
        self.entries.get(key)
    }
}

/// Everything the fakes of one worker share with its test.
pub struct Fakes {
    published: Mutex<Vec<Published>>,
    kv: Mutex<HashMap<String, Bucket>>,
    pub clock: Clock,
    env: HashMap<String, String>,
    calls: mpsc::UnboundedSender<Call>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Fakes {
    pub fn new(env: HashMap<String, String>, clock: Clock, calls: mpsc::UnboundedSender<Call>) -> Self {
        Fakes { published: Default::default(), kv: Default::default(), clock, env, calls }
    }

    pub fn record(&self, message: Published) {
        lock(&self.published).push(message);
    }

    /// Publishes so far whose subject matches `pattern` (NATS wildcards), or all.
    pub fn published(&self, pattern: Option<&str>) -> Vec<Published> {
        let published = lock(&self.published);
        published
            .iter()
            .filter(|m| pattern.is_none_or(|p| crate::kind::subject_matches(p, &m.subject)))
            .cloned()
            .collect()
    }

    pub fn clear_published(&self) {
        lock(&self.published).clear();
    }

    /// Creates `bucket` if missing and stores `entries` in it.
    pub fn seed_kv(&self, bucket: &str, entries: Vec<(String, Bytes)>) {
        let mut kv = lock(&self.kv);
        let bucket = kv.entry(bucket.to_string()).or_default();
        for (key, value) in entries {
            bucket.write(&key, value);
        }
    }

    pub fn kv_entry(&self, bucket: &str, key: &str) -> Result<Option<(Bytes, u64)>, String> {
        let kv = lock(&self.kv);
        let bucket = kv.get(bucket).ok_or_else(|| missing_bucket(bucket))?;
        Ok(bucket.get(key).cloned())
    }

    /// Installs the fakes in a worker's VMs, over the real bridges.
    pub fn prelude(self: &Arc<Self>) -> Prelude {
        let fakes = self.clone();
        Prelude(Arc::new(move |lua| install(lua, &fakes)))
    }
}

fn missing_bucket(bucket: &str) -> String {
    format!(
        "kv: no bucket {bucket:?}; create it with kv.bucket({bucket:?}) or seed it with \
         test.worker(script, {{ kv = {{ {bucket} = {{}} }} }})"
    )
}

/// `nats.publish` records, `nats.request` asks the test's responders.
pub struct FakeTransport(pub Arc<Fakes>);

impl Transport for FakeTransport {
    fn publish(
        &self,
        subject: Subject,
        headers: Option<HeaderMap>,
        data: Bytes,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        self.0.record(Published { subject: subject.to_string(), headers, data });
        Box::pin(async { Ok(()) })
    }

    fn request(
        &self,
        subject: String,
        headers: Option<HeaderMap>,
        data: Bytes,
        _: Duration,
    ) -> BoxFuture<'_, Result<Response, TransportError>> {
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            let call = Call::Request { subject: subject.clone(), headers, data, reply };
            if self.0.calls.send(call).is_err() {
                return Err(TransportError::NoResponders(subject));
            }
            answer.await.unwrap_or(Err(TransportError::NoResponders(subject)))
        })
    }
}

fn install(lua: &Lua, fakes: &Arc<Fakes>) -> mlua::Result<()> {
    let globals = lua.globals();
    let time: Table = globals.get("time")?;
    let clock = fakes.clone();
    time.set("now", lua.create_function(move |_, ()| Ok(clock.clock.now()))?)?;
    let clock = fakes.clone();
    time.set(
        "sleep",
        lua.create_async_function(move |_, duration: Value| {
            let clock = clock.clone();
            async move {
                clock.clock.advance(duration_of(&duration, "time.sleep")?);
                tokio::task::yield_now().await;
                Ok(())
            }
        })?,
    )?;

    let env = fakes.clone();
    let getenv = lua.create_function(move |_, name: String| Ok(env.env.get(&name).cloned()))?;
    globals.get::<Table>("env")?.set("get", getenv.clone())?;
    if let Ok(os) = globals.get::<Table>("os") {
        os.set("getenv", getenv)?;
    }

    let raw = kv_functions(lua, fakes)?;
    globals.set("kv", crate::lua_api::kv::raising(lua, raw)?)
}

fn error_table(lua: &Lua, code: u16, message: &str) -> mlua::Result<Value> {
    let table = lua.create_table()?;
    table.set("code", code)?;
    table.set("message", message)?;
    Ok(Value::Table(table))
}

/// What a raw fake returns: results, then an error table or nil.
type KvResult = (Value, Value, Value);

/// The raw KV functions the production wrappers (`lua_api::kv::raising`) turn
/// into `kv.*`: each returns (a, b, error table), as the live ones do.
fn kv_functions(lua: &Lua, fakes: &Arc<Fakes>) -> mlua::Result<Table> {
    let raw = lua.create_table()?;
    raw.set(
        "get",
        bucket_function(lua, fakes, |lua, _, b, key: String| match b.get(&key) {
            Some((value, revision)) => {
                Ok((crate::lua_api::kv::value_of(lua, value)?, Value::Integer(*revision as i64), Value::Nil))
            }
            None => Ok((Value::Nil, Value::Nil, Value::Nil)),
        })?,
    )?;
    raw.set(
        "put",
        bucket_function(lua, fakes, |lua, _, b, (key, value): (String, Value)| {
            Ok(written(b.write(&key, body_of(lua, &value)?)))
        })?,
    )?;
    raw.set(
        "create",
        bucket_function(lua, fakes, |lua, _, b, (key, value): (String, Value)| {
            let bytes = body_of(lua, &value)?;
            if b.get(&key).is_some() {
                return Ok((Value::Nil, Value::Nil, Value::Nil));
            }
            Ok(written(b.write(&key, bytes)))
        })?,
    )?;
    raw.set(
        "update",
        bucket_function(lua, fakes, |lua, name, b, (key, value, revision): (String, Value, i64)| {
            let bytes = body_of(lua, &value)?;
            let current = b.get(&key).map(|(_, r)| *r as i64);
            if current != Some(revision) {
                let message = crate::lua_api::kv::conflict_message(name, &key, revision);
                return Ok((Value::Nil, Value::Nil, error_table(lua, 409, &message)?));
            }
            Ok(written(b.write(&key, bytes)))
        })?,
    )?;
    raw.set(
        "delete",
        bucket_function(lua, fakes, |_, _, b, key: String| {
            b.entries.remove(&key);
            b.last_revision += 1;
            Ok((Value::Nil, Value::Nil, Value::Nil))
        })?,
    )?;
    raw.set(
        "keys",
        bucket_function(lua, fakes, |lua, _, b, prefix: Option<String>| {
            let prefix = prefix.as_deref().unwrap_or("");
            let keys = lua.create_sequence_from(b.entries.keys().filter(|k| k.starts_with(prefix)).cloned())?;
            Ok((Value::Table(keys), Value::Nil, Value::Nil))
        })?,
    )?;
    let f = fakes.clone();
    raw.set(
        "bucket",
        lua.create_function(move |_, (bucket, _opts): (String, Option<Table>)| {
            lock(&f.kv).entry(bucket).or_default();
            Ok((Value::Nil, Value::Nil, Value::Nil))
        })?,
    )?;
    Ok(raw)
}

/// A raw KV function whose first argument names the bucket; on a missing
/// bucket it returns the 404 error table the server's answer becomes.
fn bucket_function<A: mlua::FromLuaMulti>(
    lua: &Lua,
    fakes: &Arc<Fakes>,
    op: impl Fn(&Lua, &str, &mut Bucket, A) -> mlua::Result<KvResult> + 'static,
) -> mlua::Result<mlua::Function> {
    let fakes = fakes.clone();
    lua.create_function(move |lua, (bucket, args): (String, A)| {
        let mut kv = lock(&fakes.kv);
        match kv.get_mut(&bucket) {
            Some(found) => op(lua, &bucket, found, args),
            None => Ok((Value::Nil, Value::Nil, error_table(lua, 404, &missing_bucket(&bucket))?)),
        }
    })
}

/// A write's result: the new revision.
fn written(revision: u64) -> KvResult {
    (Value::Integer(revision as i64), Value::Nil, Value::Nil)
}

/// `http.request`'s exchange under test: each request goes to the test's
/// routes, after the same checks and encoding as in production.
pub struct FakeHttp(pub Arc<Fakes>);

impl HttpExchange for FakeHttp {
    fn exchange(
        &self,
        request: reqwest::Request,
        max_body: usize,
    ) -> LocalBoxFuture<'static, Result<ExchangedResponse, HttpFailure>> {
        let mut headers = HeaderMap::new();
        for (name, value) in request.headers() {
            headers.append(name.as_str(), String::from_utf8_lossy(value.as_bytes()).as_ref());
        }
        let body = request.body().and_then(|body| body.as_bytes()).map(Bytes::copy_from_slice).unwrap_or_default();
        let request =
            HttpRequest { method: request.method().to_string(), url: request.url().to_string(), headers, body };
        let (reply, answer) = oneshot::channel();
        let unanswered = || HttpFailure { code: 502, message: "the test ended".to_string() };
        let sent = self.0.calls.send(Call::Http { request, reply });
        Box::pin(async move {
            sent.map_err(|_| unanswered())?;
            match answer.await.map_err(|_| unanswered())? {
                Ok(response) if response.body.len() > max_body => Err(too_large(max_body)),
                Ok(response) => {
                    let mut headers = reqwest::header::HeaderMap::new();
                    for (name, values) in response.headers.iter() {
                        for value in values {
                            if let (Ok(name), Ok(value)) = (
                                reqwest::header::HeaderName::from_bytes(AsRef::<str>::as_ref(name).as_bytes()),
                                reqwest::header::HeaderValue::from_str(value.as_str()),
                            ) {
                                headers.append(name, value);
                            }
                        }
                    }
                    Ok(ExchangedResponse { status: response.status, headers, body: response.body.to_vec() })
                }
                Err((code, message)) => Err(HttpFailure { code, message }),
            }
        })
    }
}
