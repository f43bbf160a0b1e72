//! Keyed consumers: messages of one key one at a time and in stream order
//! across the whole pool, different partitions in parallel.
//!
//! The stream stores each message under its partition (a subject transform
//! with the server's `partition()`, see [`crate::partitioning`]); each
//! partition has a durable consumer with `max_ack_pending = 1`, so the server
//! hands out a partition's next message only once the one before it is acked,
//! termed or dead-lettered, whoever held it, and redelivers an unacked one
//! (a nak, a crash) before anything after it. That is the ordering guarantee;
//! everything else here only spreads the work.
//!
//! The live workers share the partitions evenly ([`membership`]); a worker pulls
//! only the partitions it owns, in a priority group whose server pins one client
//! per partition. A worker that gives a partition up stops pulling it, hands
//! back what arrived and unpins it, so the new owner is pinned at once; one
//! that takes over a partition from a worker that is gone unpins it itself, and
//! otherwise unpins it after [`UNPIN_FALLBACK`] if its pulls are still not
//! served.
//!
//! [`membership`]: super::membership

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::future::LocalBoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::JetStreamSource;
use super::consumer_config::PIN_GROUP;
use super::membership::{Members, Membership};
use super::pull::Pinning;
use super::setup::{self, SetupError};
use crate::partitioning::{Partitioning, Transform};
use crate::source::{Forwarding, Link, OpenError, Placement, Source};
use crate::source_spec::ConsumerSpec;
use crate::telemetry::{discovery, metrics};

/// How long a new owner waits for the previous one to unpin a partition before
/// it unpins the partition itself.
const UNPIN_FALLBACK: Duration = Duration::from_secs(2);

/// A keyed consumer: one [`JetStreamSource`] per partition.
pub struct KeyedSource {
    spec: Arc<ConsumerSpec>,
    /// The stream, on the process's connection, for unpinning partitions.
    stream: jetstream::stream::Stream,
    partitions: Vec<Arc<JetStreamSource>>,
    metrics: Arc<metrics::ConsumerMetrics>,
}

impl KeyedSource {
    /// Checks the server and the stream, then makes every partition's consumer ready.
    pub async fn prepare(client: &async_nats::Client, spec: ConsumerSpec) -> Result<Self, SetupError> {
        let Some(keyed) = spec.keyed.clone() else {
            unreachable!("a keyed source is built only for a keyed declaration");
        };
        if !client.is_server_compatible(2, 11, 0) {
            return Err(SetupError::Config(format!(
                "bus.consume {}/{} with key needs nats-server 2.11 or newer (it builds on subject transforms, \
                 2.10, and priority groups with pinned clients, 2.11); this server is {}",
                spec.stream,
                spec.consumer,
                client.server_info().version
            )));
        }
        let stream = ensure_partitioned_stream(client, &spec, &keyed).await?;
        let mut partitions = Vec::with_capacity(keyed.partitions as usize);
        for partition in 0..keyed.partitions {
            let mut source = JetStreamSource::prepare(client, spec.partition(&keyed, partition)).await?;
            source.partition = Some(partition);
            partitions.push(Arc::new(source));
        }
        let metrics = metrics::global().consumer(&spec.stream, &spec.consumer);
        metrics.set_partitions_owned(0);
        Ok(KeyedSource { spec: Arc::new(spec), stream, partitions, metrics })
    }

    fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }
}

/// The stream must store messages under their partition: created so when
/// missing (with `create_stream`), refused with the configuration to add otherwise.
async fn ensure_partitioned_stream(
    client: &async_nats::Client,
    spec: &ConsumerSpec,
    keyed: &Partitioning,
) -> Result<jetstream::stream::Stream, SetupError> {
    let js = jetstream::new(client.clone());
    let wanted = keyed.transform();
    let transform_of = |config: &jetstream::stream::Config| {
        config
            .subject_transform
            .as_ref()
            .map(|t| Transform { source: t.source.clone(), destination: t.destination.clone() })
    };
    match js.get_stream(&spec.stream).await {
        Ok(stream) => {
            let existing = transform_of(&stream.cached_info().config);
            if existing.as_ref() == Some(&wanted) {
                return Ok(stream);
            }
            let has = match existing {
                Some(existing) => format!("it has {existing}"),
                None => "it has no subject transform".to_string(),
            };
            Err(SetupError::Config(format!(
                "stream {:?} does not store subject {:?} by partition for key {} over {} partitions ({has}); \
                 add this to the stream's configuration: {wanted} (for example with `nats stream edit {}`). \
                 Messages stored before it are in no partition",
                spec.stream, wanted.source, keyed.key, keyed.partitions, spec.stream
            )))
        }
        Err(err) if setup::is_stream_not_found(&err) => {
            let Some(subjects) = &spec.create_stream else {
                return Err(SetupError::Config(format!(
                    "stream {:?} does not exist; create it with {wanted}, or let bus.consume create it with \
                     create_stream = {{ subjects = {{ ... }} }}",
                    spec.stream
                )));
            };
            js.create_stream(jetstream::stream::Config {
                name: spec.stream.clone(),
                subjects: subjects.clone(),
                subject_transform: Some(jetstream::stream::SubjectTransform {
                    source: wanted.source.clone(),
                    destination: wanted.destination.clone(),
                }),
                ..Default::default()
            })
            .await
            .map_err(|cause| SetupError::Refused {
                context: format!("cannot create stream {:?} with {wanted}", spec.stream),
                cause: cause.into(),
            })
        }
        Err(cause) => {
            Err(SetupError::Lookup { context: format!("cannot look up stream {:?}", spec.stream), cause: cause.into() })
        }
    }
}

impl Source for KeyedSource {
    fn describe(&self) -> String {
        let ack_wait = self.partitions.first().map(|p| p.ack_wait).unwrap_or_default();
        format!("{} ack_wait={}", self.spec.describe(), humantime::format_duration(ack_wait))
    }

    /// Once per process: partitions are shared between processes, and a
    /// partition has one message in flight, which any of the process's VMs can run.
    fn placement(&self) -> Placement {
        Placement::Once
    }

    fn open(self: Arc<Self>, link: Link) -> LocalBoxFuture<'static, Result<Forwarding, OpenError>> {
        Box::pin(async move {
            let Some(client) = link.client.clone() else {
                return Err(OpenError::NoConnection(self.describe()));
            };
            let membership = Membership::join(&client, &self.spec.stream, &self.spec.consumer)
                .await
                .map_err(|cause| OpenError::Membership { what: self.describe(), cause })?;
            let (members, watched) = watch::channel(membership.members());
            let leave = CancellationToken::new();
            let membership = tokio::task::spawn_local(membership.run(members, leave.clone()));
            let owner = PartitionOwner { source: self, client, link, running: BTreeMap::new(), previous: None };
            Ok(Box::pin(owner.run(watched, leave, membership)) as Forwarding)
        })
    }
}

/// A partition this worker pulls.
struct Running {
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    pinned: Rc<Cell<bool>>,
    /// When to unpin the partition if the previous owner has not.
    unpin_at: Option<Instant>,
}

/// Starts and stops the partition pullers as the members change.
struct PartitionOwner {
    source: Arc<KeyedSource>,
    client: async_nats::Client,
    link: Link,
    running: BTreeMap<u32, Running>,
    previous: Option<Members>,
}

impl PartitionOwner {
    async fn run(
        mut self,
        mut watched: watch::Receiver<Members>,
        leave: CancellationToken,
        membership: tokio::task::JoinHandle<()>,
    ) {
        loop {
            let members = watched.borrow_and_update().clone();
            self.follow(members).await;
            let unpin_at = self.running.values().filter_map(|running| running.unpin_at).min();
            tokio::select! {
                biased;
                _ = self.link.stop.cancelled() => break,
                changed = watched.changed() => if changed.is_err() { break },
                _ = sleep_until(unpin_at) => self.unpin_unserved().await,
            }
        }
        // Stop pulling (what already arrived is handed back), leave so the others
        // take over, and unpin, so they are served at once.
        let released: Vec<u32> = self.running.keys().copied().collect();
        for partition in &released {
            self.release(*partition).await;
        }
        leave.cancel();
        let _ = membership.await;
        self.source.metrics.set_partitions_owned(0);
        discovery::set_partitions(&self.source.spec.consumer, &[]);
    }

    /// Pulls exactly the partitions `members` gives this worker.
    async fn follow(&mut self, members: Members) {
        let owned = members.owned(self.source.partition_count());
        let given_up: Vec<u32> = self.running.keys().copied().filter(|p| !owned.contains(p)).collect();
        for partition in given_up {
            self.release(partition).await;
        }
        for &partition in &owned {
            if self.running.contains_key(&partition) {
                continue;
            }
            // The previous owner is gone (stopped or dead): nobody else will unpin.
            let previous_gone =
                self.previous.as_ref().is_some_and(|previous| !members.contains(previous.owner(partition)));
            if previous_gone {
                self.unpin(partition).await;
            }
            if let Err(err) = self.acquire(partition, !previous_gone).await {
                tracing::warn!(source = %self.source.describe(), partition, error = %err, "cannot pull partition");
            }
        }
        if self.previous.as_ref().is_none_or(|previous| previous.owned(self.source.partition_count()) != owned) {
            tracing::info!(
                stream = %self.source.spec.stream, consumer = %self.source.spec.consumer,
                workers = members.count(), partitions = ?owned, "serving partitions"
            );
        }
        self.source.metrics.set_partitions_owned(owned.len());
        discovery::set_partitions(&self.source.spec.consumer, &owned);
        self.previous = Some(members);
    }

    async fn acquire(&mut self, partition: u32, unpin_later: bool) -> Result<(), OpenError> {
        let source = self.source.partitions[partition as usize].clone();
        let pinned = Rc::new(Cell::new(false));
        let pinning = Pinning { group: PIN_GROUP, id: None, pinned: pinned.clone() };
        let (puller, subscriber) = source.puller(self.client.clone(), Some(pinning)).await?;
        let stop = self.link.stop.child_token();
        let link = Link {
            client: Some(self.client.clone()),
            sink: self.link.sink.clone(),
            stop: stop.clone(),
            index: self.link.index,
        };
        let done = tokio::task::spawn_local(puller.run(source, subscriber, link));
        let unpin_at = unpin_later.then(|| Instant::now() + UNPIN_FALLBACK);
        self.running.insert(partition, Running { stop, done, pinned, unpin_at });
        Ok(())
    }

    async fn release(&mut self, partition: u32) {
        if let Some(running) = self.running.remove(&partition) {
            running.stop.cancel();
            let _ = running.done.await;
            self.unpin(partition).await;
        }
    }

    /// Unpins the partitions whose previous owner has had its time to let go.
    async fn unpin_unserved(&mut self) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .running
            .iter_mut()
            .filter(|(_, running)| running.unpin_at.is_some_and(|at| at <= now))
            .map(|(partition, running)| {
                running.unpin_at = None;
                (*partition, running.pinned.get())
            })
            .filter(|(_, pinned)| !pinned)
            .map(|(partition, _)| partition)
            .collect();
        for partition in due {
            self.unpin(partition).await;
        }
    }

    /// Asks the server to pin the partition's consumer afresh.
    async fn unpin(&self, partition: u32) {
        let consumer = &self.source.partitions[partition as usize].consumer;
        let request = self.source.stream.unpin_consumer(consumer, PIN_GROUP);
        match tokio::time::timeout(Duration::from_secs(2), request).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::debug!(partition, error = %err, "cannot unpin partition"),
            Err(_) => tracing::debug!(partition, "unpinning a partition timed out"),
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
