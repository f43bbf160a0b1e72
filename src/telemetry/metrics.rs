//! Prometheus metrics for `/metrics`, in the classic text format.
//!
//! Per-event figures are kept per VM: each VM thread is the only writer of its
//! own counters, so recording an event is a few plain loads and stores on memory
//! no other thread writes (no lock, no contended atomic). A scrape sums the VMs.
//! Everything else (intake refusals, NATS connections, JetStream consumers) is
//! read or counted where it happens and encoded at scrape time.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::connection::State;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc::WeakSender;

use crate::event::Event;
use crate::outcome::Outcome;
use crate::telemetry::overload::IntakeStats;

/// Upper bounds of the handler duration histogram, in seconds.
const DURATION_BOUNDS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds of the VM wait histogram, in seconds: from a fraction of a
/// millisecond (a VM that keeps up) past the default time slice to whole
/// seconds (slicing off, or code that cannot yield).
const WAIT_BOUNDS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Upper bounds of the JetStream pull size histogram, in messages.
const PULL_BOUNDS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
/// Outcome labels, in the order [`VmRecorder::finished`] indexes them.
const OUTCOMES: [&str; 4] = ["ack", "nak", "term", "error"];

/// A counter with one writing thread: a load and a store, no read-modify-write.
#[derive(Debug, Default)]
pub struct Tally(AtomicU64);

impl Tally {
    fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Handler figures of one kind on one VM.
#[derive(Debug, Default)]
struct KindStats {
    outcomes: [Tally; OUTCOMES.len()],
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [Tally; DURATION_BOUNDS.len() + 1],
    nanos: Tally,
}

/// What one source (a NATS micro endpoint) did on one VM.
#[derive(Debug, Default)]
pub struct EndpointStats {
    requests: Tally,
    errors: Tally,
    nanos: Tally,
    /// Written only when an event fails.
    last_error: Mutex<Option<(u16, String)>>,
}

/// One VM's figures, as the scrape reads them.
#[derive(Debug, Default)]
struct VmMetrics {
    started: Tally,
    finished: Tally,
    kinds: Mutex<Vec<(Box<str>, Arc<KindStats>)>>,
    endpoints: Mutex<Vec<Arc<EndpointStats>>>,
    queue: Mutex<Option<WeakSender<Box<Event>>>>,
    /// Per-bucket (not cumulative) counts of [`WAIT_BOUNDS`]; the last is `+Inf`.
    wait_buckets: [Tally; WAIT_BOUNDS.len() + 1],
    wait_nanos: Tally,
    preemptions: Tally,
}

/// A JetStream consumer's figures; written by every VM that pulls from it.
#[derive(Debug)]
pub struct ConsumerMetrics {
    stream: String,
    consumer: String,
    redeliveries: AtomicU64,
    dead_letters: AtomicU64,
    in_progress_acks: AtomicU64,
    pulls: [AtomicU64; PULL_BOUNDS.len() + 1],
    pulled: AtomicU64,
    received: AtomicU64,
    /// Partitions of a keyed consumer this worker serves; -1 for other consumers.
    partitions_owned: std::sync::atomic::AtomicI64,
}

impl ConsumerMetrics {
    /// A message delivered more than once arrived.
    pub fn redelivered(&self) {
        self.redeliveries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dead_lettered(&self) {
        self.dead_letters.fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_progress_ack(&self) {
        self.in_progress_acks.fetch_add(1, Ordering::Relaxed);
    }

    /// A message arrived (a keyed consumer's partitions count under their own consumers).
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// How many partitions of this keyed consumer this worker serves now.
    pub fn set_partitions_owned(&self, count: usize) {
        self.partitions_owned.store(count as i64, Ordering::Relaxed);
    }

    /// A pull request for `batch` messages was sent.
    pub fn pulled(&self, batch: usize) {
        let bucket = PULL_BOUNDS.iter().position(|bound| batch as f64 <= *bound).unwrap_or(PULL_BOUNDS.len());
        self.pulls[bucket].fetch_add(1, Ordering::Relaxed);
        self.pulled.fetch_add(batch as u64, Ordering::Relaxed);
    }
}

/// The process's metrics.
#[derive(Default)]
pub struct Metrics {
    vms: Mutex<Vec<Arc<VmMetrics>>>,
    consumers: Mutex<Vec<Arc<ConsumerMetrics>>>,
    intake: Mutex<Vec<Arc<IntakeStats>>>,
    clients: Mutex<Vec<async_nats::Client>>,
    slow_consumers: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    /// Counts refusals of this intake in `agent_block_intake_*`.
    pub fn watch_intake(&self, stats: Arc<IntakeStats>) {
        lock(&self.intake).push(stats);
    }

    /// Reports this connection's state and reconnects.
    pub fn watch_client(&self, client: async_nats::Client) {
        lock(&self.clients).push(client);
    }

    /// NATS told a connection that it dropped messages for a slow subscription.
    pub fn slow_consumer(&self) {
        self.slow_consumers.fetch_add(1, Ordering::Relaxed);
    }

    /// The figures of a JetStream consumer, shared by every VM pulling from it.
    pub fn consumer(&self, stream: &str, consumer: &str) -> Arc<ConsumerMetrics> {
        let mut consumers = lock(&self.consumers);
        if let Some(found) = consumers.iter().find(|c| c.stream == stream && c.consumer == consumer) {
            return found.clone();
        }
        let created = Arc::new(ConsumerMetrics {
            stream: stream.to_string(),
            consumer: consumer.to_string(),
            redeliveries: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            in_progress_acks: AtomicU64::new(0),
            pulls: Default::default(),
            pulled: AtomicU64::new(0),
            received: AtomicU64::new(0),
            partitions_owned: std::sync::atomic::AtomicI64::new(-1),
        });
        consumers.push(created.clone());
        created
    }

    /// Per-endpoint statistics summed over the VMs, indexed like the sources.
    pub fn endpoint_totals(&self, count: usize) -> Vec<EndpointTotals> {
        let mut totals: Vec<EndpointTotals> = (0..count).map(|_| EndpointTotals::default()).collect();
        for vm in lock(&self.vms).iter() {
            for (total, stats) in totals.iter_mut().zip(lock(&vm.endpoints).iter()) {
                total.requests += stats.requests.get();
                total.errors += stats.errors.get();
                total.processing_time += Duration::from_nanos(stats.nanos.get());
                if let Some(error) = lock(&stats.last_error).clone() {
                    total.last_error = Some(error);
                }
            }
        }
        totals
    }

    /// The `/metrics` page in the Prometheus text format.
    pub fn encode(&'static self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(self)));
        let mut page = String::new();
        if let Err(err) = prometheus_client::encoding::prometheus_text::encode(&mut page, &registry) {
            tracing::warn!(error = %err, "cannot encode metrics");
        }
        page
    }
}

/// An endpoint's figures over all VMs.
#[derive(Debug, Default, Clone)]
pub struct EndpointTotals {
    pub requests: u64,
    pub errors: u64,
    pub processing_time: Duration,
    pub last_error: Option<(u16, String)>,
}

/// Records events on one VM thread; lives on that VM.
pub struct VmRecorder {
    shared: Arc<VmMetrics>,
    /// Looked up once per event: foldhash, as for the handlers.
    kinds: RefCell<foldhash::HashMap<Box<str>, Arc<KindStats>>>,
    endpoints: RefCell<Vec<Arc<EndpointStats>>>,
}

impl VmRecorder {
    /// Registers a VM whose queue is `queue` (held weakly, so it still closes at
    /// shutdown).
    pub fn new(queue: WeakSender<Box<Event>>) -> Self {
        let shared = Arc::new(VmMetrics { queue: Mutex::new(Some(queue)), ..Default::default() });
        lock(&global().vms).push(shared.clone());
        VmRecorder { shared, kinds: Default::default(), endpoints: Default::default() }
    }

    /// A handler started.
    pub fn started(&self) {
        self.shared.started.add(1);
    }

    /// A handler that could run (its event taken in, its wait over, or its
    /// slice ended with others ready) waited `waited` for the VM.
    pub fn waited(&self, waited: Duration) {
        let seconds = waited.as_secs_f64();
        let bucket = WAIT_BOUNDS.iter().position(|bound| seconds <= *bound).unwrap_or(WAIT_BOUNDS.len());
        self.shared.wait_buckets[bucket].add(1);
        self.shared.wait_nanos.add(waited.as_nanos() as u64);
    }

    /// A handler was suspended at the end of its time slice, behind others.
    pub fn preempted(&self) {
        self.shared.preemptions.add(1);
    }

    /// A handler for `event` ended with `outcome` after `elapsed`.
    pub fn finished(&self, event: &Event, outcome: &Outcome, elapsed: Duration) {
        self.shared.finished.add(1);
        let nanos = elapsed.as_nanos() as u64;
        let index = match outcome {
            Outcome::Ack { .. } => 0,
            Outcome::Nak { .. } => 1,
            Outcome::Term { .. } => 2,
            Outcome::Error(_) => 3,
        };
        let seconds = elapsed.as_secs_f64();
        let bucket = DURATION_BOUNDS.iter().position(|bound| seconds <= *bound).unwrap_or(DURATION_BOUNDS.len());
        {
            let mut kinds = self.kinds.borrow_mut();
            let stats = match kinds.get(event.kind.as_str()) {
                Some(stats) => stats,
                None => {
                    let stats = Arc::new(KindStats::default());
                    lock(&self.shared.kinds).push((event.kind.as_str().into(), stats.clone()));
                    kinds.entry(event.kind.as_str().into()).or_insert(stats)
                }
            };
            stats.outcomes[index].add(1);
            stats.buckets[bucket].add(1);
            stats.nanos.add(nanos);
        }
        if let Some(source) = event.source_index {
            let mut endpoints = self.endpoints.borrow_mut();
            let index = source as usize;
            if index >= endpoints.len() {
                let mut shared = lock(&self.shared.endpoints);
                while shared.len() <= index {
                    shared.push(Arc::default());
                }
                *endpoints = shared.clone();
            }
            let endpoint = &endpoints[index];
            endpoint.requests.add(1);
            endpoint.nanos.add(nanos);
            if let Outcome::Error(failure) = outcome {
                endpoint.errors.add(1);
                *lock(&endpoint.last_error) = Some((failure.code, failure.message.clone()));
            }
        }
    }
}

/// Encodes everything at scrape time.
struct Scrape(&'static Metrics);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

#[derive(Default)]
struct KindTotals {
    outcomes: [u64; OUTCOMES.len()],
    buckets: [u64; DURATION_BOUNDS.len() + 1],
    nanos: u64,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)
}

/// A counter whose name the encoder completes with `_total`.
fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, u64, u64>(&value, None)
}

fn counters(encoder: &mut DescriptorEncoder, name: &str, help: &str, series: &[(Labels<'_>, u64)]) -> std::fmt::Result {
    if series.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        metric.encode_family(labels)?.encode_counter::<NoLabelSet, u64, u64>(value, None)?;
    }
    Ok(())
}

fn histogram_buckets(bounds: &[f64], counts: impl Iterator<Item = u64>) -> Vec<(f64, u64)> {
    bounds.iter().copied().chain(std::iter::once(f64::INFINITY)).zip(counts).collect()
}

/// The VMs' figures summed at scrape time.
#[derive(Default)]
struct VmTotals {
    kinds: BTreeMap<Box<str>, KindTotals>,
    in_flight: i64,
    queued: i64,
    waits: [u64; WAIT_BOUNDS.len() + 1],
    wait_nanos: u64,
    preemptions: u64,
}

impl VmTotals {
    fn sum(vms: &[Arc<VmMetrics>]) -> Self {
        let mut totals = VmTotals::default();
        for vm in vms {
            for (sum, tally) in totals.waits.iter_mut().zip(&vm.wait_buckets) {
                *sum += tally.get();
            }
            totals.wait_nanos += vm.wait_nanos.get();
            totals.preemptions += vm.preemptions.get();
            // `finished` first: a handler ending between the reads is then
            // counted as still running, never as a negative.
            let finished = vm.finished.get();
            totals.in_flight += vm.started.get().saturating_sub(finished) as i64;
            if let Some(queue) = lock(&vm.queue).as_ref().and_then(|q| q.upgrade()) {
                totals.queued += (queue.max_capacity() - queue.capacity()) as i64;
            }
            for (kind, stats) in lock(&vm.kinds).iter() {
                let total = totals.kinds.entry(kind.clone()).or_default();
                for (sum, tally) in total.outcomes.iter_mut().zip(&stats.outcomes) {
                    *sum += tally.get();
                }
                for (sum, tally) in total.buckets.iter_mut().zip(&stats.buckets) {
                    *sum += tally.get();
                }
                total.nanos += stats.nanos.get();
            }
        }
        totals
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let metrics = self.0;
        let vms: Vec<Arc<VmMetrics>> = lock(&metrics.vms).clone();
        let totals = VmTotals::sum(&vms);
        let info = encoder.encode_descriptor(
            "agent_block_build_info",
            "Always 1; the version label names the running agent-block.",
            None,
            MetricType::Gauge,
        );
        info?.encode_family(&vec![("version", env!("CARGO_PKG_VERSION"))])?.encode_gauge(&1i64)?;
        encode_events(&totals, &mut encoder)?;
        encode_vms(&totals, &mut encoder)?;
        encode_intake(metrics, &mut encoder)?;
        encode_nats(metrics, &mut encoder)?;
        encode_consumers(metrics, &mut encoder)
    }
}

/// Events by kind and outcome, and handler durations by kind.
fn encode_events(totals: &VmTotals, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    let mut events = Vec::new();
    for (kind, total) in &totals.kinds {
        for (outcome, count) in OUTCOMES.iter().zip(total.outcomes) {
            if count > 0 {
                events.push((vec![("kind", &**kind), ("outcome", *outcome)], count));
            }
        }
    }
    counters(encoder, "agent_block_events", "Events handled, by kind and outcome.", &events)?;
    if totals.kinds.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(
        "agent_block_handler_duration_seconds",
        "Time from handler start to its outcome, by kind.",
        None,
        MetricType::Histogram,
    )?;
    for (kind, total) in &totals.kinds {
        let count = total.buckets.iter().sum();
        let buckets = histogram_buckets(&DURATION_BOUNDS, total.buckets.iter().copied());
        let labels = vec![("kind", &**kind)];
        metric.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            total.nanos as f64 / 1e9,
            count,
            &buckets,
            None,
        )?;
    }
    Ok(())
}

/// What the VMs run and hold: handlers in flight, queued events, the wait for
/// a VM and preemptions.
fn encode_vms(totals: &VmTotals, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    gauge(encoder, "agent_block_handlers_in_flight", "Handlers running now.", totals.in_flight)?;
    gauge(encoder, "agent_block_queued_events", "Events waiting in the VM queues for a handler slot.", totals.queued)?;
    encoder
        .encode_descriptor(
            "agent_block_vm_wait_seconds",
            "Time a handler that could run waited for its VM: from its event taken in, its wait over, \
             or its time slice ended with others ready, until it ran.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            totals.wait_nanos as f64 / 1e9,
            totals.waits.iter().sum(),
            &histogram_buckets(&WAIT_BOUNDS, totals.waits.iter().copied()),
            None,
        )?;
    counter(
        encoder,
        "agent_block_vm_preemptions",
        "Handlers suspended at the end of their time slice because others on the VM were ready.",
        totals.preemptions,
    )
}

/// Events the intake refused, and spans the export queue dropped, because they were full.
fn encode_intake(metrics: &Metrics, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    let (mut rejected, mut dropped) = (0, 0);
    for stats in lock(&metrics.intake).iter() {
        rejected += stats.rejected.load(Ordering::Relaxed);
        dropped += stats.dropped.load(Ordering::Relaxed);
    }
    counter(encoder, "agent_block_intake_rejected", "Requests answered 503 because the intake was full.", rejected)?;
    counter(
        encoder,
        "agent_block_intake_dropped",
        "Messages without a reply subject dropped because the intake was full.",
        dropped,
    )?;
    counter(
        encoder,
        "agent_block_spans_dropped",
        "Event spans dropped because the span export queue was full.",
        crate::telemetry::span_export::dropped(),
    )
}

fn encode_nats(metrics: &Metrics, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    let clients = lock(&metrics.clients).clone();
    let (mut connected, mut disconnected, mut pending, mut reconnects) = (0i64, 0i64, 0i64, 0u64);
    for client in &clients {
        match client.connection_state() {
            State::Connected => connected += 1,
            State::Disconnected => disconnected += 1,
            State::Pending => pending += 1,
        }
        reconnects += client.statistics().connects.load(Ordering::Relaxed).saturating_sub(1);
    }
    let all_up = i64::from(!clients.is_empty() && connected == clients.len() as i64);
    gauge(encoder, "agent_block_nats_connected", "1 while every NATS connection of the worker is up, else 0.", all_up)?;
    let mut states = encoder.encode_descriptor(
        "agent_block_nats_connections",
        "The worker's NATS connections by state.",
        None,
        MetricType::Gauge,
    )?;
    for (state, count) in [("connected", connected), ("disconnected", disconnected), ("pending", pending)] {
        states.encode_family(&vec![("state", state)])?.encode_gauge(&count)?;
    }
    counter(encoder, "agent_block_nats_reconnects", "Times a NATS connection was re-established.", reconnects)?;
    counter(
        encoder,
        "agent_block_nats_slow_consumer_events",
        "Times NATS dropped messages because a subscription fell behind.",
        metrics.slow_consumers.load(Ordering::Relaxed),
    )
}

fn labels(c: &ConsumerMetrics) -> Labels<'_> {
    vec![("stream", &c.stream), ("consumer", &c.consumer)]
}

fn encode_consumers(metrics: &Metrics, encoder: &mut DescriptorEncoder) -> std::fmt::Result {
    let consumers = lock(&metrics.consumers).clone();
    if consumers.is_empty() {
        return Ok(());
    }
    let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
    let series = |read: &dyn Fn(&ConsumerMetrics) -> u64| -> Vec<(Labels<'_>, u64)> {
        consumers.iter().map(|c| (labels(c), read(c))).collect()
    };
    counters(
        encoder,
        "agent_block_jetstream_messages",
        "JetStream messages received, by consumer (partition p of a keyed consumer C is consumer C-p).",
        &series(&|c| load(&c.received)),
    )?;
    let keyed: Vec<_> = consumers.iter().filter(|c| c.partitions_owned.load(Ordering::Relaxed) >= 0).collect();
    if !keyed.is_empty() {
        let mut owned = encoder.encode_descriptor(
            "agent_block_jetstream_partitions_owned",
            "Partitions of a keyed consumer this worker serves.",
            None,
            MetricType::Gauge,
        )?;
        for consumer in keyed {
            owned.encode_family(&labels(consumer))?.encode_gauge(&consumer.partitions_owned.load(Ordering::Relaxed))?;
        }
    }
    counters(
        encoder,
        "agent_block_jetstream_redeliveries",
        "JetStream messages received more than once.",
        &series(&|c| load(&c.redeliveries)),
    )?;
    counters(
        encoder,
        "agent_block_jetstream_dead_letters",
        "JetStream messages published to the dead-letter subject and terminated.",
        &series(&|c| load(&c.dead_letters)),
    )?;
    counters(
        encoder,
        "agent_block_jetstream_in_progress_acks",
        "In-progress acks sent for long-running handlers.",
        &series(&|c| load(&c.in_progress_acks)),
    )?;
    let mut pulls = encoder.encode_descriptor(
        "agent_block_jetstream_pull_batch_messages",
        "Messages asked for per JetStream pull request.",
        None,
        MetricType::Histogram,
    )?;
    for consumer in &consumers {
        let counts: Vec<u64> = consumer.pulls.iter().map(load).collect();
        let buckets = histogram_buckets(&PULL_BOUNDS, counts.iter().copied());
        let labels = labels(consumer);
        pulls.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            load(&consumer.pulled) as f64,
            counts.iter().sum(),
            &buckets,
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Failure;

    #[test]
    fn a_scrape_sums_what_the_vms_recorded() {
        let (queue, _receiver) = tokio::sync::mpsc::channel(4);
        let recorder = VmRecorder::new(queue.downgrade());
        let mut event = Event::new("scrape-test".into(), "s".into(), None, None, Default::default());
        event.source_index = Some(1);
        recorder.started();
        recorder.finished(&event, &Outcome::empty_ack(), Duration::from_millis(3));
        recorder.started();
        recorder.finished(&event, &Outcome::Error(Failure::timeout(Duration::from_secs(1))), Duration::from_secs(2));
        recorder.waited(Duration::from_millis(30));
        recorder.preempted();
        global().consumer("S", "C").pulled(5);
        let page = global().encode();
        assert!(page.contains("agent_block_events_total{kind=\"scrape-test\",outcome=\"ack\"} 1"), "{page}");
        assert!(page.contains("agent_block_events_total{kind=\"scrape-test\",outcome=\"error\"} 1"), "{page}");
        assert!(page.contains("agent_block_handler_duration_seconds_bucket{kind=\"scrape-test\",le=\"0.005\"} 1"));
        assert!(page.contains("agent_block_handler_duration_seconds_count{kind=\"scrape-test\"} 2"));
        assert!(page.contains("agent_block_vm_wait_seconds_bucket{le=\"0.05\"} "), "{page}");
        assert!(page.contains("agent_block_vm_preemptions_total "), "{page}");
        assert!(
            page.contains("agent_block_jetstream_pull_batch_messages_bucket{stream=\"S\",consumer=\"C\",le=\"8\"} 1"),
            "{page}"
        );
        let totals = global().endpoint_totals(2);
        assert!(totals[1].requests >= 2 && totals[1].errors >= 1);
        assert_eq!(totals[1].last_error.as_ref().map(|e| e.0), Some(504));
    }
}
