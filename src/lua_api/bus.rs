//! The `bus` global: handler registration, sources (`subscribe`, `consume`), `serve`, and the explicit
//! outcomes `bus.reply`, `bus.nak`, `bus.term`.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use mlua::{Lua, Table, UserData, Value};

use crate::kind::KindTemplate;
use crate::lua::state::{Phase, VmState};
use crate::lua_api::{body_of, duration_of, headers_of};
use crate::partitioning::Partitioning;
use crate::source_spec::{ConsumerSpec, Queue, SourceSpec, SubscriptionSpec};

/// What a handler returned through `bus.reply`, `bus.nak` or `bus.term`.
pub enum Directive {
    Reply { body: Bytes, headers: Option<HeaderMap> },
    Nak { delay: Option<Duration> },
    Term { reason: String },
}

impl UserData for Directive {}

pub fn install(lua: &Lua) -> mlua::Result<()> {
    let bus = lua.create_table()?;
    bus.set("on", lua.create_function(on)?)?;
    bus.set("on_any", lua.create_function(on_any)?)?;
    bus.set("subscribe", lua.create_function(subscribe)?)?;
    bus.set("consume", lua.create_function(consume)?)?;
    bus.set("serve", lua.create_async_function(|lua, ()| serve(lua))?)?;
    bus.set("worker_id", lua.create_function(|lua, ()| Ok(VmState::of(lua).worker_id))?)?;
    bus.set("workers", lua.create_function(|lua, ()| Ok(VmState::of(lua).workers))?)?;
    bus.set("reply", lua.create_function(reply)?)?;
    bus.set("nak", lua.create_function(nak)?)?;
    bus.set("term", lua.create_function(term)?)?;
    lua.globals().set("bus", bus)
}

fn on(lua: &Lua, (kind, handler): (Value, Value)) -> mlua::Result<()> {
    let (Value::String(kind), Value::Function(handler)) = (kind, handler) else {
        return Err(mlua::Error::runtime("bus.on expects (kind: string, handler: function)"));
    };
    let kind = kind.to_str()?.to_string();
    let state = VmState::of(lua);
    if state.handlers.borrow_mut().insert(kind.clone(), handler) && state.is_first() {
        tracing::warn!(kind = %kind, "bus.on: replacing the handler registered earlier for this kind");
    }
    Ok(())
}

fn on_any(lua: &Lua, handler: Value) -> mlua::Result<()> {
    let Value::Function(handler) = handler else {
        return Err(mlua::Error::runtime("bus.on_any expects a handler function"));
    };
    let state = VmState::of(lua);
    if state.handlers.borrow_mut().set_any(handler) && state.is_first() {
        tracing::warn!("bus.on_any: replacing the fallback handler registered earlier");
    }
    Ok(())
}

fn subscribe(lua: &Lua, (subject, opts): (String, Option<Table>)) -> mlua::Result<()> {
    let state = VmState::of(lua);
    if state.phase.get() != Phase::Init {
        return Err(mlua::Error::runtime("bus.subscribe must be called at the script's top level, before bus.serve()"));
    }
    if subject.is_empty() || subject.contains(char::is_whitespace) {
        return Err(mlua::Error::runtime(format!("bus.subscribe: invalid subject {subject:?}")));
    }
    let opts = match opts {
        Some(opts) => opts,
        None => lua.create_table()?,
    };
    let template = opts.get::<Option<String>>("kind")?.unwrap_or_else(|| KindTemplate::DEFAULT.to_string());
    let kind = KindTemplate::parse(&template, &subject).map_err(mlua::Error::runtime)?;
    let queue = match opts.get::<Value>("queue")? {
        Value::Nil => Queue::Default,
        Value::Boolean(false) => Queue::None,
        Value::String(name) if !name.as_bytes().is_empty() => Queue::Named(name.to_str()?.to_string()),
        other => {
            return Err(mlua::Error::runtime(format!(
                "bus.subscribe: queue must be a group name or false, got {}",
                other.type_name()
            )));
        }
    };
    let timeout = optional_duration(&opts, "timeout", "bus.subscribe")?;
    state.sources.borrow_mut().push(SourceSpec::Subscribe(SubscriptionSpec { subject, kind, queue, timeout }));
    Ok(())
}

/// `bus.consume{ stream, consumer, subject, kind, ack_wait, max_deliver, backoff,
/// max_ack_pending, dead_letter, timeout, create_stream = { subjects = {...} } }`.
/// The options `bus.consume` takes.
const CONSUME_OPTIONS: &[&str] = &[
    "stream",
    "consumer",
    "subject",
    "kind",
    "ack_wait",
    "max_deliver",
    "backoff",
    "max_ack_pending",
    "dead_letter",
    "timeout",
    "create_stream",
    "key",
    "partitions",
];

fn consume(lua: &Lua, opts: Table) -> mlua::Result<()> {
    let state = VmState::of(lua);
    if state.phase.get() != Phase::Init {
        return Err(mlua::Error::runtime("bus.consume must be called at the script's top level, before bus.serve()"));
    }
    check_options(&opts)?;
    let subject = opts.get::<Option<String>>("subject")?;
    if let Some(subject) = &subject
        && (subject.is_empty() || subject.contains(char::is_whitespace))
    {
        return Err(mlua::Error::runtime(format!("bus.consume: invalid subject {subject:?}")));
    }
    let template = opts.get::<Option<String>>("kind")?.unwrap_or_else(|| KindTemplate::DEFAULT.to_string());
    let kind = KindTemplate::parse(&template, subject.as_deref().unwrap_or(">")).map_err(mlua::Error::runtime)?;
    let spec = ConsumerSpec {
        stream: name(&opts, "stream")?,
        consumer: name(&opts, "consumer")?,
        create_stream: create_stream(&opts, subject.as_ref())?,
        subject,
        kind,
        ack_wait: optional_duration(&opts, "ack_wait", "bus.consume")?,
        max_deliver: positive(&opts, "max_deliver")?,
        backoff: backoff(&opts)?,
        max_ack_pending: positive(&opts, "max_ack_pending")?,
        dead_letter: dead_letter(&opts)?,
        timeout: optional_duration(&opts, "timeout", "bus.consume")?,
        keyed: None,
    };
    let spec = ConsumerSpec { keyed: keyed(&opts, &spec)?, ..spec };
    let mut sources = state.sources.borrow_mut();
    let duplicate = sources.iter().any(
        |s| matches!(s, SourceSpec::Consume(other) if other.stream == spec.stream && other.consumer == spec.consumer),
    );
    if duplicate {
        return Err(mlua::Error::runtime(format!(
            "bus.consume: consumer {}/{} is declared twice",
            spec.stream, spec.consumer
        )));
    }
    sources.push(SourceSpec::Consume(spec));
    Ok(())
}

/// `key` and `partitions`: one partition when only `key` is given; the
/// consumer's own ack-pending limit is what keeps a partition in order, so it
/// cannot be set.
fn keyed(opts: &Table, spec: &ConsumerSpec) -> mlua::Result<Option<Box<Partitioning>>> {
    let key = opts.get::<Option<String>>("key")?;
    let partitions = opts.get::<Option<i64>>("partitions")?;
    let Some(key) = key else {
        return match partitions {
            Some(_) => Err(mlua::Error::runtime("bus.consume: partitions needs a key, e.g. key = \"{{wildcard(1)}}\"")),
            None => Ok(None),
        };
    };
    let Some(subject) = &spec.subject else {
        return Err(mlua::Error::runtime("bus.consume: a keyed consumer needs a subject whose wildcards make the key"));
    };
    if spec.max_ack_pending.is_some() {
        return Err(mlua::Error::runtime(
            "bus.consume: a keyed consumer handles one message per partition at a time; remove max_ack_pending \
             (raise partitions for more parallelism)",
        ));
    }
    let partitions = u32::try_from(partitions.unwrap_or(1)).unwrap_or(0);
    Partitioning::parse(&key, partitions, subject)
        .map(|keyed| Some(Box::new(keyed)))
        .map_err(|err| mlua::Error::runtime(format!("bus.consume: {err}")))
}

/// Refuses an option `bus.consume` does not know (a typo would be ignored).
fn check_options(opts: &Table) -> mlua::Result<()> {
    for pair in opts.pairs::<Value, Value>() {
        let (key, _) = pair?;
        let name = key.to_string().unwrap_or_default();
        if !CONSUME_OPTIONS.contains(&name.as_str()) {
            return Err(mlua::Error::runtime(format!(
                "bus.consume: unknown option {name:?} (known: {})",
                CONSUME_OPTIONS.join(", ")
            )));
        }
    }
    Ok(())
}

/// A required stream or consumer name: no whitespace, dots or wildcards.
fn name(opts: &Table, key: &str) -> mlua::Result<String> {
    match opts.get::<Value>(key)? {
        Value::String(s) if !s.as_bytes().is_empty() => {
            let text = s.to_str()?.to_string();
            if text.contains(|c: char| c.is_whitespace() || c == '.' || c == '*' || c == '>') {
                return Err(mlua::Error::runtime(format!("bus.consume: invalid {key} {text:?}")));
            }
            Ok(text)
        }
        _ => Err(mlua::Error::runtime(format!("bus.consume: `{key}` (a name) is required"))),
    }
}

fn positive(opts: &Table, key: &str) -> mlua::Result<Option<i64>> {
    match opts.get::<Option<i64>>(key)? {
        Some(n) if n < 1 => Err(mlua::Error::runtime(format!("bus.consume: {key} must be at least 1"))),
        other => Ok(other),
    }
}

fn backoff(opts: &Table) -> mlua::Result<Vec<Duration>> {
    match opts.get::<Value>("backoff")? {
        Value::Nil => Ok(Vec::new()),
        Value::Table(list) => list
            .sequence_values::<Value>()
            .map(|value| duration_of(&value?, "bus.consume backoff"))
            .collect::<mlua::Result<_>>(),
        other => Err(mlua::Error::runtime(format!(
            "bus.consume: backoff must be a list of durations, got {}",
            other.type_name()
        ))),
    }
}

/// The subjects of a stream to create when missing; by default the consumer's
/// subject.
fn create_stream(opts: &Table, subject: Option<&String>) -> mlua::Result<Option<Vec<String>>> {
    match opts.get::<Value>("create_stream")? {
        Value::Nil | Value::Boolean(false) => Ok(None),
        Value::Table(table) => {
            let subjects: Vec<String> = match table.get::<Option<Table>>("subjects")? {
                Some(list) => list.sequence_values::<String>().collect::<mlua::Result<_>>()?,
                None => subject.cloned().into_iter().collect(),
            };
            if subjects.is_empty() {
                return Err(mlua::Error::runtime("bus.consume: create_stream needs `subjects`"));
            }
            Ok(Some(subjects))
        }
        other => Err(mlua::Error::runtime(format!(
            "bus.consume: create_stream must be a table {{ subjects = {{...}} }}, got {}",
            other.type_name()
        ))),
    }
}

fn dead_letter(opts: &Table) -> mlua::Result<Option<String>> {
    let dead_letter = opts.get::<Option<String>>("dead_letter")?;
    if let Some(subject) = &dead_letter
        && (subject.is_empty() || subject.contains(|c: char| c.is_whitespace() || c == '*' || c == '>'))
    {
        return Err(mlua::Error::runtime(format!("bus.consume: invalid dead_letter subject {subject:?}")));
    }
    Ok(dead_letter)
}

fn optional_duration(opts: &Table, key: &str, what: &str) -> mlua::Result<Option<Duration>> {
    match opts.get::<Value>(key)? {
        Value::Nil => Ok(None),
        value => duration_of(&value, &format!("{what} {key}")).map(Some),
    }
}

/// Ends init: marks the VM ready and waits until shutdown releases it.
async fn serve(lua: Lua) -> mlua::Result<()> {
    let state = VmState::of(&lua);
    if state.phase.get() != Phase::Init {
        return Err(mlua::Error::runtime("bus.serve() may be called only once, from the script's top level"));
    }
    state.phase.set(Phase::Serving);
    if let Some(done) = state.init_done.borrow_mut().take() {
        let _ = done.send(());
    }
    state.release.cancelled().await;
    Ok(())
}

fn reply(lua: &Lua, (value, opts): (Value, Option<Table>)) -> mlua::Result<Directive> {
    let headers = match opts {
        Some(opts) => opts.get::<Option<Table>>("headers")?.map(|t| headers_of(&t)).transpose()?,
        None => None,
    };
    Ok(Directive::Reply { body: body_of(lua, &value)?, headers })
}

fn nak(_: &Lua, opts: Option<Table>) -> mlua::Result<Directive> {
    let delay = match opts {
        Some(opts) => match opts.get::<Value>("delay")? {
            Value::Nil => None,
            value => Some(duration_of(&value, "bus.nak delay")?),
        },
        None => None,
    };
    Ok(Directive::Nak { delay })
}

fn term(_: &Lua, reason: Option<String>) -> mlua::Result<Directive> {
    Ok(Directive::Term { reason: reason.unwrap_or_else(|| "terminated by handler".to_string()) })
}
