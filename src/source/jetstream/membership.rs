//! Which live workers share a keyed consumer's partitions. Each process keeps a
//! key alive in a KV bucket with a heartbeat and watches the others' keys; the
//! partitions are dealt round-robin over the sorted member ids, so every worker
//! computes the same owners from the same members, without a coordinator.
//! A worker that stops deletes its key; one that dies falls silent and is
//! dropped after [`SILENCE`].

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The KV bucket holding one key per worker and keyed consumer.
pub const BUCKET: &str = "agent-block-members";
/// How often a worker renews its key.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A member not heard from for this long is taken as gone.
const SILENCE: Duration = Duration::from_secs(3);
/// Keys of dead workers leave the bucket after this long.
const BUCKET_MAX_AGE: Duration = Duration::from_secs(10);
/// How long joining waits to read the members already there.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(2);

/// The workers sharing one keyed consumer, as one of them sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// Sorted, and always holding `me`.
    ids: Vec<String>,
    me: String,
}

impl Members {
    fn new(mut ids: Vec<String>, me: &str) -> Self {
        if !ids.iter().any(|id| id == me) {
            ids.push(me.to_string());
        }
        ids.sort();
        ids.dedup();
        Members { ids, me: me.to_string() }
    }

    /// The member that serves `partition`.
    pub fn owner(&self, partition: u32) -> &str {
        &self.ids[partition as usize % self.ids.len()]
    }

    /// The partitions of `partitions` this worker serves.
    pub fn owned(&self, partitions: u32) -> Vec<u32> {
        (0..partitions).filter(|&partition| self.owner(partition) == self.me).collect()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.iter().any(|member| member == id)
    }

    pub fn count(&self) -> usize {
        self.ids.len()
    }
}

/// This worker's place among the workers of one keyed consumer.
pub struct Membership {
    js: jetstream::Context,
    kv: kv::Store,
    /// `<stream>.<consumer>`, the prefix of every member's key.
    prefix: String,
    me: String,
    watcher: Option<kv::Watch>,
    last_seen: HashMap<String, Instant>,
}

impl Membership {
    /// Opens (or creates) the bucket, announces this worker and reads the
    /// members already there, so its first view is not "alone".
    pub async fn join(client: &async_nats::Client, stream: &str, consumer: &str) -> Result<Self, async_nats::Error> {
        let js = jetstream::new(client.clone());
        let kv = bucket(&js).await?;
        let prefix = format!("{}.{}", key_token(stream), key_token(consumer));
        let me = nuid::next().to_string();
        let mut membership = Membership { js, kv, prefix, me, watcher: None, last_seen: HashMap::new() };
        membership.beat().await?;
        let mut watcher = membership.kv.watch_with_history(format!("{}.*", membership.prefix)).await?;
        let caught_up = Instant::now() + CATCH_UP_LIMIT;
        let mut entries = Vec::new();
        while let Ok(Some(Ok(entry))) = tokio::time::timeout_at(caught_up, watcher.next()).await {
            let last = entry.delta == 0;
            entries.push(entry);
            if last {
                break;
            }
        }
        // Keys a dead worker left are older than a heartbeat's silence; the
        // server's clock dates them all, this worker's own key included.
        let own_key = membership.key();
        let now = entries.iter().find(|entry| entry.key == own_key).map(|entry| entry.created);
        for entry in entries {
            let recent = now.is_none_or(|now| now - entry.created < SILENCE);
            if recent {
                membership.record(entry);
            }
        }
        membership.watcher = Some(watcher);
        Ok(membership)
    }

    /// The members as this worker sees them now.
    pub fn members(&self) -> Members {
        let ids = self.last_seen.keys().cloned().collect();
        Members::new(ids, &self.me)
    }

    /// Keeps this worker's key alive and `members` current until `stop`, then
    /// deletes the key so the others take over at once.
    pub async fn run(mut self, members: watch::Sender<Members>, stop: CancellationToken) {
        let mut next_beat = Instant::now() + HEARTBEAT;
        let mut tick = tokio::time::interval(HEARTBEAT / 4);
        loop {
            if self.watcher.is_none() {
                self.watcher = self.kv.watch_with_history(format!("{}.*", self.prefix)).await.ok();
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                entry = next_entry(&mut self.watcher) => match entry {
                    Some(Ok(entry)) => self.record(entry),
                    // Reconnecting: watch afresh on the next turn.
                    _ => self.watcher = None,
                },
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            if now >= next_beat {
                if let Err(err) = self.beat().await {
                    tracing::debug!(error = %err, "cannot renew partition membership");
                    // A restarted server has lost the bucket (memory storage).
                    if let Ok(kv) = bucket(&self.js).await {
                        self.kv = kv;
                        self.watcher = None;
                    }
                }
                next_beat = now + HEARTBEAT;
            }
            let me = self.me.clone();
            self.last_seen.retain(|id, seen| *id == me || now.duration_since(*seen) < SILENCE);
            let current = self.members();
            members.send_if_modified(|members| {
                let changed = *members != current;
                *members = current;
                changed
            });
        }
        if let Err(err) = self.kv.delete(self.key()).await {
            tracing::debug!(error = %err, "cannot leave partition membership");
        }
    }

    fn key(&self) -> String {
        format!("{}.{}", self.prefix, self.me)
    }

    async fn beat(&mut self) -> Result<(), async_nats::Error> {
        self.kv.put(self.key(), bytes::Bytes::new()).await?;
        self.last_seen.insert(self.me.clone(), Instant::now());
        Ok(())
    }

    fn record(&mut self, entry: kv::Entry) {
        let Some(id) = entry.key.rsplit('.').next() else { return };
        match entry.operation {
            kv::Operation::Put => {
                self.last_seen.insert(id.to_string(), Instant::now());
            }
            kv::Operation::Delete | kv::Operation::Purge if id != self.me => {
                self.last_seen.remove(id);
            }
            _ => {}
        }
    }
}

/// The membership bucket, created when missing.
async fn bucket(js: &jetstream::Context) -> Result<kv::Store, async_nats::Error> {
    if let Ok(kv) = js.get_key_value(BUCKET).await {
        return Ok(kv);
    }
    let config = kv::Config {
        bucket: BUCKET.to_string(),
        description: "agent-block: workers sharing keyed consumers' partitions".to_string(),
        history: 1,
        max_age: BUCKET_MAX_AGE,
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(kv) => Ok(kv),
        // Another worker created it first.
        Err(created) => js.get_key_value(BUCKET).await.map_err(|_| created.into()),
    }
}

async fn next_entry(watcher: &mut Option<kv::Watch>) -> Option<Result<kv::Entry, kv::WatcherError>> {
    match watcher {
        Some(watcher) => watcher.next().await,
        None => std::future::pending().await,
    }
}

/// A stream or consumer name as a KV key token (letters, digits, `-`, `_`, `=`).
fn key_token(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=') { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[&str], me: &str) -> Members {
        Members::new(ids.iter().map(|id| id.to_string()).collect(), me)
    }

    #[test]
    fn partitions_are_dealt_evenly_and_alike_by_every_member() {
        let ids = ["c", "a", "b"];
        let shares: Vec<Vec<u32>> = ids.iter().map(|me| members(&ids, me).owned(8)).collect();
        assert_eq!(shares, vec![vec![2, 5], vec![0, 3, 6], vec![1, 4, 7]]);
        for partition in 0..8 {
            let owners: Vec<String> = ids.iter().map(|me| members(&ids, me).owner(partition).to_string()).collect();
            assert!(owners.windows(2).all(|pair| pair[0] == pair[1]), "partition {partition}: {owners:?}");
        }
    }

    #[test]
    fn a_member_always_sees_itself() {
        let alone = members(&[], "me");
        assert_eq!(alone.owned(3), vec![0, 1, 2]);
        assert_eq!(alone.count(), 1);
        assert!(members(&["x"], "me").contains("me"));
    }

    #[test]
    fn names_become_key_tokens() {
        assert_eq!(key_token("ORD-1_x"), "ORD-1_x");
        assert_eq!(key_token("a/b:c"), "a_b_c");
    }
}
