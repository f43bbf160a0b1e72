//! `test.worker(script, opts)`: the script under test loaded into a real VM pool
//! (one VM) whose bridges are fakes, and events sent to it one at a time. Events
//! go through the same intake, dispatch and outcome code as in production; only
//! their settling is recorded instead of sent to NATS.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures::future::LocalBoxFuture;
use mlua::{Lua, Table, UserData, UserDataMethods, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::bridge::http_exchange::HttpExchange;
use crate::event::{Event, KeyedMeta, Settle, StreamMeta};
use crate::kind::subject_matches;
use crate::lua_api::event::headers_table;
use crate::lua_api::kv::value_of;
use crate::lua_api::{body_of, duration_of, headers_of, json};
use crate::outcome::Outcome;
use crate::partitioning::Partitioning;
use crate::settings::{DEFAULT_BUS_CAPACITY, DEFAULT_HANDLER_TIMEOUT, DEFAULT_TIME_SLICE, LuaConfig};
use crate::source::jetstream::policy::{self, Action};
use crate::source::{ConsumerSpec, Forwarding, Link, OpenError, Placement, Source, SourceSpec};
use crate::testkit::fakes::{Call, Clock, FakeHttp, FakeTransport, Fakes, Published};
use crate::testkit::partition::keyed_meta;
use crate::testkit::schedule::Schedule;
use crate::worker::{BridgeSpec, PoolSpec, VmPool};

/// Handlers the worker under test may run at once.
const CONCURRENCY: usize = 16;
/// `w:consume` and `w:consume_all` give up on a message still nak'ed after this
/// many deliveries when its consumer has no `max_deliver`.
const UNLIMITED_DELIVERIES: u64 = 100;

/// A running worker under test.
pub struct TestWorker {
    script: PathBuf,
    pool: RefCell<Option<VmPool>>,
    events: RefCell<Option<mpsc::UnboundedSender<Event>>>,
    stop: CancellationToken,
    sources: Vec<SourceSpec>,
    pub fakes: Arc<Fakes>,
    next_sequence: Cell<u64>,
}

/// How a test event was settled, sent back from the worker's thread.
struct Settled {
    outcome: Outcome,
    kind: String,
    /// Set for JetStream events: what the consumer did with the message.
    jetstream: Option<JetStreamAction>,
}

enum JetStreamAction {
    Ack,
    Nak(Option<Duration>),
    Term { reason: String, dead_letter: Option<Published> },
}

impl TestWorker {
    /// Loads `script` with fakes; `opts`: `env`, `kv` (bucket -> key -> value),
    /// `timeout` (handler deadline), `now` (the virtual clock's start, seconds).
    pub async fn start(
        lua: &Lua,
        script: PathBuf,
        opts: Option<Table>,
        calls: mpsc::UnboundedSender<Call>,
    ) -> mlua::Result<TestWorker> {
        let opts = match opts {
            Some(opts) => opts,
            None => lua.create_table()?,
        };
        let mut env = HashMap::new();
        if let Some(table) = opts.get::<Option<Table>>("env")? {
            for pair in table.pairs::<String, Value>() {
                let (name, value) = pair?;
                env.insert(name, value.to_string()?);
            }
        }
        let timeout = match opts.get::<Value>("timeout")? {
            Value::Nil => DEFAULT_HANDLER_TIMEOUT,
            value => duration_of(&value, "test.worker timeout")?,
        };
        let fakes = Arc::new(Fakes::new(env, Clock::new(opts.get::<Option<f64>>("now")?), calls));
        if let Some(buckets) = opts.get::<Option<Table>>("kv")? {
            for pair in buckets.pairs::<String, Table>() {
                let (bucket, entries) = pair?;
                let mut seeded = Vec::new();
                for entry in entries.pairs::<String, Value>() {
                    let (key, value) = entry?;
                    seeded.push((key, body_of(lua, &value)?));
                }
                fakes.seed_kv(&bucket, seeded);
            }
        }
        let spec = PoolSpec {
            script: script.clone(),
            workers: 1,
            concurrency: CONCURRENCY,
            bus_capacity: DEFAULT_BUS_CAPACITY,
            handler_timeout: timeout,
            time_slice: Some(DEFAULT_TIME_SLICE),
            lua: LuaConfig { prelude: Some(fakes.prelude()), ..LuaConfig::default() },
            transport: Arc::new(FakeTransport(fakes.clone())),
            connection: None,
            bridges: BridgeSpec::OfflineWithHttp({
                let fakes = fakes.clone();
                Arc::new(move || Rc::new(FakeHttp(fakes.clone())) as Rc<dyn HttpExchange>)
            }),
        };
        let (mut pool, report) = VmPool::start(spec)
            .await
            .map_err(|err| mlua::Error::runtime(format!("test.worker: {}", crate::report::chain(&err))))?;
        let (events, receiver) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let source: Arc<dyn Source> = Arc::new(TestSource(Mutex::new(Some(receiver))));
        pool.open_sources(&[source], &stop).await.map_err(|err| mlua::Error::runtime(crate::report::chain(&err)))?;
        Ok(TestWorker {
            script,
            pool: RefCell::new(Some(pool)),
            events: RefCell::new(Some(events)),
            stop,
            sources: report.sources,
            fakes,
            next_sequence: Cell::new(0),
        })
    }

    /// Stops the worker, letting handlers in flight finish.
    pub async fn shutdown(&self) {
        self.events.borrow_mut().take();
        self.stop.cancel();
        let pool = self.pool.borrow_mut().take();
        if let Some(pool) = pool {
            pool.shutdown(tokio::time::Instant::now() + Duration::from_secs(5)).await;
        }
    }

    fn source_for(&self, subject: &str) -> mlua::Result<&SourceSpec> {
        self.sources.iter().find(|s| subject_matches(s.subject_and_kind().0, subject)).ok_or_else(|| {
            let declared: Vec<String> = self.sources.iter().map(|s| s.subject_and_kind().0.to_string()).collect();
            mlua::Error::runtime(format!(
                "no bus.subscribe or bus.consume of {} matches subject {subject:?} (declared: {})",
                self.script.display(),
                if declared.is_empty() { "none".to_string() } else { declared.join(", ") }
            ))
        })
    }

    /// Sends one event and waits until it is settled.
    async fn deliver(
        &self,
        lua: &Lua,
        subject: &str,
        data: &Value,
        opts: Option<&Table>,
        delivery: Delivery,
    ) -> mlua::Result<Settled> {
        let source = self.source_for(subject)?;
        let headers = match opts.map(|o| o.get::<Option<Table>>("headers")).transpose()?.flatten() {
            Some(table) => Some(headers_of(&table)?),
            None => None,
        };
        let subject = Subject::from(subject);
        let kind = source.subject_and_kind().1.render(&subject);
        let data = body_of(lua, data)?;
        let (done, settled) = oneshot::channel();
        let mut event = match source {
            SourceSpec::Subscribe(_) => Event::new(kind, subject, Some(Subject::from("_INBOX.test")), headers, data),
            SourceSpec::Consume(spec) => {
                let keyed = keyed_meta_of(spec, &subject);
                // A keyed message comes from its partition's own durable consumer.
                let consumer = match &keyed {
                    Some(keyed) => Partitioning::consumer_name(&spec.consumer, keyed.partition),
                    None => spec.consumer.clone(),
                };
                let meta = StreamMeta {
                    stream: spec.stream.as_str().into(),
                    consumer: consumer.into(),
                    delivered: delivery.delivered,
                    stream_sequence: delivery.sequence,
                    pending: 0,
                    published: SystemTime::now(),
                    ack_subject: None,
                    keyed,
                };
                Event::of_stream(kind, subject, headers, data, meta)
            }
        };
        event.timeout = source.timeout();
        event.delivery = Some(Box::new(Recorder {
            done: Some(done),
            consumer: match source {
                SourceSpec::Consume(spec) => Some((spec.clone(), self.fakes.clone())),
                SourceSpec::Subscribe(_) => None,
            },
            delivered: delivery.delivered,
        }));
        let sender = self.events.borrow().clone();
        let sent = sender.map(|s| s.send(event).is_ok()).unwrap_or(false);
        if !sent {
            return Err(mlua::Error::runtime("the worker under test has stopped"));
        }
        settled.await.map_err(|_| mlua::Error::runtime("the worker under test stopped before settling the event"))
    }

    fn sequence(&self) -> u64 {
        self.next_sequence.set(self.next_sequence.get() + 1);
        self.next_sequence.get()
    }

    /// The consumer reading `subject`; `method` names the caller in the error.
    fn consumer_for(&self, method: &str, subject: &str) -> mlua::Result<ConsumerSpec> {
        match self.source_for(subject) {
            Ok(SourceSpec::Consume(spec)) => Ok(spec.clone()),
            _ => Err(mlua::Error::runtime(format!(
                "{method}: subject {subject:?} is not read by a bus.consume of {}",
                self.script.display()
            ))),
        }
    }

    /// The `{ subject, data, opts? }` list given to `w:consume_all`, each checked
    /// against the consumers and given its stream sequence in list order.
    fn queued(&self, messages: &Table) -> mlua::Result<Vec<Queued>> {
        let mut queued = Vec::new();
        for (position, item) in messages.sequence_values::<Value>().enumerate() {
            let shape_error = || {
                mlua::Error::runtime(format!(
                    "w:consume_all: message {} is not {{ subject, data, opts? }}",
                    position + 1
                ))
            };
            let Value::Table(item) = item? else { return Err(shape_error()) };
            let Value::String(subject) = item.raw_get::<Value>(1)? else { return Err(shape_error()) };
            let subject = subject.to_str()?.to_string();
            let spec = self.consumer_for("w:consume_all", &subject)?;
            let lane = keyed_meta_of(&spec, &subject)
                .map(|keyed| (spec.stream.clone(), spec.consumer.clone(), keyed.partition));
            queued.push(Queued {
                data: item.raw_get(2)?,
                opts: item.raw_get(3)?,
                sequence: self.sequence(),
                lane,
                spec,
                subject,
            });
        }
        Ok(queued)
    }
}

/// `ev.meta.key` and `ev.meta.partition` of a keyed consumer's message.
fn keyed_meta_of(spec: &ConsumerSpec, subject: &str) -> Option<KeyedMeta> {
    let keyed = spec.keyed.as_deref()?;
    Some(keyed_meta(keyed, spec.subject.as_deref().unwrap_or_default(), subject))
}

struct Delivery {
    delivered: u64,
    sequence: u64,
}

/// One message of `w:consume_all`.
struct Queued {
    subject: String,
    data: Value,
    opts: Option<Table>,
    spec: ConsumerSpec,
    sequence: u64,
    /// A keyed consumer's stream, consumer and partition: the partition's durable
    /// consumer has one message in flight, so its messages go one at a time.
    lane: Option<(String, String, u32)>,
}

/// What the consumer does with a message after one of its deliveries.
enum Next {
    /// Delivered again after the nak delay.
    Again(Duration),
    /// Acked, terminated, dead-lettered, or nak'ed at `max_deliver`.
    Finished,
    /// Still nak'ed after [`UNLIMITED_DELIVERIES`] without a `max_deliver`.
    GaveUp,
}

fn next_after(spec: &ConsumerSpec, delivered: u64, settled: &Settled) -> Next {
    let Some(JetStreamAction::Nak(delay)) = &settled.jetstream else { return Next::Finished };
    let limit = spec.max_deliver.and_then(|m| u64::try_from(m).ok()).unwrap_or(UNLIMITED_DELIVERIES);
    if delivered < limit {
        Next::Again(delay.unwrap_or_default())
    } else if spec.max_deliver.is_none() {
        Next::GaveUp
    } else {
        Next::Finished
    }
}

fn gave_up(method: &str) -> mlua::Error {
    mlua::Error::runtime(format!("{method}: still nak'ed after {UNLIMITED_DELIVERIES} deliveries"))
}

/// The handle test files hold.
pub struct WorkerHandle(pub std::rc::Rc<TestWorker>);

impl UserData for WorkerHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // w:send(subject, data?, { headers, delivered }) -> outcome
        methods.add_async_method(
            "send",
            |lua, this, (subject, data, opts): (String, Value, Option<Table>)| async move {
                let worker = this.0.clone();
                let delivered = match &opts {
                    Some(opts) => opts.get::<Option<u64>>("delivered")?.unwrap_or(1).max(1),
                    None => 1,
                };
                let delivery = Delivery { delivered, sequence: worker.sequence() };
                let settled = worker.deliver(&lua, &subject, &data, opts.as_ref(), delivery).await?;
                outcome_table(&lua, settled)
            },
        );
        // w:consume(subject, data?, opts): delivers until the consumer stops
        // redelivering (ack, term, dead letter, or max_deliver), moving the virtual
        // clock by each nak delay; the last outcome, with `deliveries` and `history`.
        methods.add_async_method(
            "consume",
            |lua, this, (subject, data, opts): (String, Value, Option<Table>)| async move {
                let worker = this.0.clone();
                let spec = worker.consumer_for("w:consume", &subject)?;
                let sequence = worker.sequence();
                let history = lua.create_table()?;
                let mut delivered = 0;
                loop {
                    delivered += 1;
                    let delivery = Delivery { delivered, sequence };
                    let settled = worker.deliver(&lua, &subject, &data, opts.as_ref(), delivery).await?;
                    let next = next_after(&spec, delivered, &settled);
                    let table = outcome_table(&lua, settled)?;
                    history.push(table.clone())?;
                    match next {
                        Next::Again(delay) => worker.fakes.clock.advance(delay),
                        Next::GaveUp => return Err(gave_up("w:consume")),
                        Next::Finished => {
                            table.set("deliveries", delivered)?;
                            table.set("history", history)?;
                            return Ok(table);
                        }
                    }
                }
            },
        );
        // w:consume_all({ { subject, data?, opts? }, ... }): the messages consumed
        // together on the virtual clock (see `Schedule`); every delivery's outcome,
        // in the order they happened, with `subject`, `index` and `delivered`.
        methods.add_async_method("consume_all", |lua, this, messages: Table| async move {
            let worker = this.0.clone();
            let messages = worker.queued(&messages)?;
            let clock = &worker.fakes.clock;
            let mut schedule = Schedule::new(messages.iter().map(|m| m.lane.clone()).collect(), clock.elapsed());
            let history = lua.create_table()?;
            while let Some((index, due)) = schedule.next() {
                clock.advance(due.saturating_sub(clock.elapsed()));
                let message = &messages[index];
                let delivered = schedule.deliver(index);
                let delivery = Delivery { delivered, sequence: message.sequence };
                let settled =
                    worker.deliver(&lua, &message.subject, &message.data, message.opts.as_ref(), delivery).await?;
                let next = next_after(&message.spec, delivered, &settled);
                let table = outcome_table(&lua, settled)?;
                table.set("subject", message.subject.as_str())?;
                table.set("index", index + 1)?;
                table.set("delivered", delivered)?;
                history.push(table)?;
                match next {
                    Next::Again(delay) => schedule.redeliver_at(index, clock.elapsed() + delay),
                    Next::Finished => schedule.finish(index),
                    Next::GaveUp => return Err(gave_up(&format!("w:consume_all: message {}", index + 1))),
                }
            }
            Ok(history)
        });
        // w:published(pattern?) -> { {subject, data, payload, headers}, ... }
        methods.add_method("published", |lua, this, pattern: Option<String>| {
            let list = lua.create_table()?;
            for message in this.0.fakes.published(pattern.as_deref()) {
                list.push(message_table(lua, &message.subject, message.headers.as_ref(), &message.data)?)?;
            }
            Ok(list)
        });
        // w:kv(bucket, key) -> value, revision
        methods.add_method("kv", |lua, this, (bucket, key): (String, String)| {
            match this.0.fakes.kv_entry(&bucket, &key).map_err(mlua::Error::runtime)? {
                Some((value, revision)) => Ok((value_of(lua, &value)?, Some(revision))),
                None => Ok((Value::Nil, None)),
            }
        });
        methods.add_method("now", |_, this, ()| Ok(this.0.fakes.clock.now()));
        methods.add_method("advance", |_, this, by: Value| {
            this.0.fakes.clock.advance(duration_of(&by, "w:advance")?);
            Ok(())
        });
    }
}

/// `{ subject, data, payload (when JSON), headers }`.
fn message_table(lua: &Lua, subject: &str, headers: Option<&HeaderMap>, data: &Bytes) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("subject", subject)?;
    body_fields(lua, &table, headers, data)?;
    Ok(table)
}

fn body_fields(lua: &Lua, table: &Table, headers: Option<&HeaderMap>, data: &Bytes) -> mlua::Result<()> {
    table.set("data", lua.create_string(data)?)?;
    if !data.is_empty()
        && let Ok(payload) = json::decode(lua, data)
    {
        table.set("payload", payload)?;
    }
    table.set("headers", headers_table(lua, headers)?)
}

/// The outcome as a test sees it: `outcome` ("ack", "error", "nak", "term"),
/// `kind`, the reply (`data`, `payload`, `headers`), `code` and `message` for
/// errors, `delay` (seconds) for naks, `reason` for terms, `dead_letter` when one
/// was published.
fn outcome_table(lua: &Lua, settled: Settled) -> mlua::Result<Table> {
    let table = lua.create_table()?;
    table.set("kind", settled.kind)?;
    if let Some((code, message)) = settled.outcome.error_reply() {
        table.set("code", code)?;
        table.set("message", message)?;
    }
    match settled.outcome {
        Outcome::Ack { body, headers } => {
            table.set("outcome", "ack")?;
            body_fields(lua, &table, headers.as_ref(), &body)?;
        }
        Outcome::Nak { delay } => {
            table.set("outcome", "nak")?;
            table.set("delay", delay.map(|d| d.as_secs_f64()))?;
        }
        Outcome::Term { reason } => {
            table.set("outcome", "term")?;
            table.set("reason", reason)?;
        }
        Outcome::Error(_) => table.set("outcome", "error")?,
    }
    match settled.jetstream {
        None | Some(JetStreamAction::Ack) => {}
        Some(JetStreamAction::Nak(delay)) => {
            table.set("outcome", "nak")?;
            table.set("delay", delay.map(|d| d.as_secs_f64()))?;
        }
        Some(JetStreamAction::Term { reason, dead_letter }) => {
            table.set("outcome", "term")?;
            table.set("reason", reason)?;
            if let Some(message) = dead_letter {
                let letter = message_table(lua, &message.subject, message.headers.as_ref(), &message.data)?;
                table.set("dead_letter", letter)?;
            }
        }
    }
    Ok(table)
}

/// Feeds the events a test sends into the worker's intake.
struct TestSource(Mutex<Option<mpsc::UnboundedReceiver<Event>>>);

impl Source for TestSource {
    fn describe(&self) -> String {
        "test events".to_string()
    }

    fn placement(&self) -> Placement {
        Placement::Once
    }

    fn open(self: Arc<Self>, link: Link) -> LocalBoxFuture<'static, Result<Forwarding, OpenError>> {
        let receiver = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        Box::pin(async move {
            let Some(mut receiver) = receiver else {
                return Err(OpenError::OpenedTwice("the test source".to_string()));
            };
            Ok(Box::pin(async move {
                loop {
                    let event = tokio::select! {
                        _ = link.stop.cancelled() => break,
                        event = receiver.recv() => event,
                    };
                    let Some(event) = event else { break };
                    if link.sink.deliver(Box::new(event)).await.is_err() {
                        break;
                    }
                }
            }) as Forwarding)
        })
    }
}

/// Settles a test event by sending its outcome back; for JetStream events it
/// decides what the consumer would do, as the JetStream source does.
struct Recorder {
    done: Option<oneshot::Sender<Settled>>,
    consumer: Option<(ConsumerSpec, Arc<Fakes>)>,
    delivered: u64,
}

impl Settle for Recorder {
    fn settle<'a>(&'a mut self, event: &'a Event, outcome: Outcome) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let jetstream = self
                .consumer
                .as_ref()
                .map(|(spec, fakes)| jetstream_action(spec, fakes, self.delivered, event, &outcome));
            if let Some(done) = self.done.take() {
                let _ = done.send(Settled { outcome, kind: event.kind.to_string(), jetstream });
            }
        })
    }
}

/// What the consumer does with `outcome`, decided by the JetStream source's own
/// policy; a dead letter is recorded as published.
fn jetstream_action(
    spec: &ConsumerSpec,
    fakes: &Fakes,
    delivered: u64,
    event: &Event,
    outcome: &Outcome,
) -> JetStreamAction {
    match policy::action(spec, delivered, outcome) {
        Action::Ack => JetStreamAction::Ack,
        Action::Nak(delay) => JetStreamAction::Nak(delay),
        Action::Term => {
            let reason = match outcome {
                Outcome::Term { reason } => reason.clone(),
                _ => String::new(),
            };
            JetStreamAction::Term { reason, dead_letter: None }
        }
        Action::DeadLetter(error) => {
            let dead_letter = spec.dead_letter.as_ref().map(|subject| {
                let headers = policy::dead_letter_headers(spec, event, delivered, &error);
                let message = Published { subject: subject.clone(), headers: Some(headers), data: event.data.clone() };
                fakes.record(message.clone());
                message
            });
            JetStreamAction::Term { reason: error, dead_letter }
        }
    }
}
