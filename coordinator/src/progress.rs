//! What the coordinator keeps in the store about upgrades, as typed records, and the key
//! layout: one place that knows both, so no other module builds a key or parses a value.
//!
//! Layout (relative to the store's prefix):
//!
//! | key | value |
//! |---|---|
//! | `upgrades/<pool>` | [`UpgradeRecord`]: the engine state and the next event number |
//! | `events/<pool>/<seq, 12 digits>` | [`EventRecord`]: one entry of the history |
//! | `pools/<pool>/failover` | [`FailoverRecord`]: whether the pool's traffic is on its pair |
//!
//! Writes are built here as [`WriteOp`]s and applied by the caller in one fenced transaction.

use crate::engine::Upgrade;
use crate::store::{KeyPage, Store, StoreError, WriteOp};
use serde::{Deserialize, Serialize};

/// The store key of a pool's upgrade state.
pub fn upgrade_key(pool: &str) -> String {
    format!("upgrades/{pool}")
}

/// The store prefix of a pool's event history.
pub fn events_prefix(pool: &str) -> String {
    format!("events/{pool}/")
}

/// The store key of one event.
pub fn event_key(pool: &str, seq: u64) -> String {
    format!("{}{seq:012}", events_prefix(pool))
}

/// The store key of a pool's failover flag.
pub fn failover_key(pool: &str) -> String {
    format!("pools/{pool}/failover")
}

/// What is stored for a pool's upgrade: the engine state and the next event number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The engine state.
    pub upgrade: Upgrade,
    /// The sequence number the next event record gets.
    pub next_event: u64,
    /// Who started it (the caller's role, e.g. `operator/alice`).
    #[serde(default)]
    pub started_by: String,
    /// When it was started (unix ms).
    #[serde(default)]
    pub started_ms: u64,
}

/// One past plan of a pool, written once when it ends: `rollgate upgrade history`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HistoryRecord {
    /// The plan.
    pub plan_id: String,
    /// The target version.
    pub version: String,
    /// Who started it.
    pub started_by: String,
    /// When (unix ms).
    pub started_ms: u64,
    /// When it ended (unix ms).
    pub ended_ms: u64,
    /// completed, failed, aborted or rolled_back.
    pub outcome: String,
    /// Why it ended so, when it did not complete.
    pub reason: String,
    /// Servers in the plan.
    pub servers: u32,
}

/// The store prefix of a pool's past plans.
pub fn history_prefix(pool: &str) -> String {
    format!("history/{pool}/")
}

/// The most past plans one read returns.
pub const MAX_HISTORY_PAGE: usize = 100;

/// The newest `limit` past plans of `pool`, oldest first.
pub async fn load_history(
    store: &Store,
    pool: &str,
    limit: usize,
) -> Result<Vec<HistoryRecord>, ProgressError> {
    let page = KeyPage {
        start: history_prefix(pool),
        // '0' follows '/': the end of the prefix.
        end: format!("history/{pool}0"),
        limit: limit.clamp(1, MAX_HISTORY_PAGE),
        from_end: true,
    };
    Ok(store
        .page(&page)
        .await?
        .iter()
        .filter_map(|kv| decode::<HistoryRecord>(&kv.key, &kv.value).ok())
        .collect())
}

/// One entry of the durable history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventRecord {
    /// Position in the pool's history.
    pub seq: u64,
    /// Wall-clock time (unix ms).
    pub at_ms: u64,
    /// The plan it belongs to.
    pub plan_id: String,
    /// The leader epoch that wrote it.
    pub epoch: u64,
    /// The coordinator that wrote it.
    pub coordinator: String,
    /// What happened (e.g. step_succeeded).
    pub kind: String,
    /// The server, if any.
    pub server: String,
    /// The domain, if any.
    pub domain: String,
    /// The detail.
    pub message: String,
}

/// Where a pool's traffic is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverRecord {
    /// True while the pool is failed over to its paired pool.
    pub failed_over: bool,
    /// The paired pool.
    pub paired_pool: String,
    /// Wall-clock time of the change (unix ms).
    pub at_ms: u64,
    /// Who asked (an operator, or "upgrade").
    pub by: String,
    /// The leader epoch that ran the hook.
    #[serde(default)]
    pub epoch: u64,
}

/// Why progress could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    /// The store failed; see [`StoreError::is_retryable`].
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored value does not decode: written by an incompatible version or damaged.
    #[error("stored value at {key} is unreadable: {message}")]
    Unreadable {
        /// The key.
        key: String,
        /// The decoder's complaint.
        message: String,
    },
}

impl ProgressError {
    /// True when reading again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProgressError::Store(e) if e.is_retryable())
    }
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, ProgressError> {
    serde_json::from_slice(bytes).map_err(|e| ProgressError::Unreadable {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // These records hold only strings, numbers, durations and maps with string keys, which
    // serde_json always encodes; an error here would be a programming error in this module.
    serde_json::to_vec(value).unwrap_or_default()
}

/// The pool's upgrade record, if one was ever stored.
pub async fn load_upgrade(
    store: &Store,
    pool: &str,
) -> Result<Option<UpgradeRecord>, ProgressError> {
    let key = upgrade_key(pool);
    match store.get(&key).await? {
        Some(kv) => decode(&key, &kv.value).map(Some),
        None => Ok(None),
    }
}

/// The next event number for a pool whose upgrade record is unreadable or absent: one past the
/// last stored event, so that a new plan never overwrites history.
pub async fn next_event_after_history(store: &Store, pool: &str) -> Result<u64, ProgressError> {
    let kvs = store.range(&events_prefix(pool)).await?;
    Ok(kvs
        .last()
        .and_then(|kv| kv.key.rsplit('/').next()?.parse::<u64>().ok())
        .map_or(0, |n| n.saturating_add(1)))
}

/// The newest `limit` events of a pool, oldest first. Unreadable entries are skipped.
pub async fn load_events(
    store: &Store,
    pool: &str,
    range: EventRange,
) -> Result<EventPage, ProgressError> {
    let prefix = events_prefix(pool);
    // Sequence numbers are stored with 12 digits: beyond that, keys would not sort.
    let start = match range.after {
        Some(a) if a >= MAX_EVENT_SEQ => {
            return Ok(EventPage {
                events: Vec::new(),
                more: false,
            })
        }
        Some(a) => event_key(pool, a + 1),
        None => prefix.clone(),
    };
    let end = match range.before {
        Some(b) if b <= MAX_EVENT_SEQ => event_key(pool, b),
        // '0' follows '/': the end of the prefix.
        _ => format!("events/{pool}0"),
    };
    let limit = range.limit.clamp(1, MAX_EVENTS_PAGE);
    let page = KeyPage {
        start,
        end,
        limit: limit + 1,
        from_end: range.after.is_none(),
    };
    let mut kvs = store.page(&page).await?;
    let more = kvs.len() > limit;
    if more {
        if page.from_end {
            kvs.remove(0);
        } else {
            kvs.pop();
        }
    }
    Ok(EventPage {
        events: kvs
            .iter()
            .filter_map(|kv| decode::<EventRecord>(&kv.key, &kv.value).ok())
            .collect(),
        more,
    })
}

/// The most events one read returns.
pub const MAX_EVENTS_PAGE: usize = 1000;
/// The largest sequence number an event key can hold (12 digits).
pub const MAX_EVENT_SEQ: u64 = 999_999_999_999;

/// Which events to read: with `after`, the oldest `limit` events after it (to follow the
/// history forward); otherwise the newest `limit` events, before `before` when given (to page
/// back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRange {
    /// Only events with a larger sequence number.
    pub after: Option<u64>,
    /// Only events with a smaller sequence number.
    pub before: Option<u64>,
    /// At most this many (clamped to 1..=[`MAX_EVENTS_PAGE`]).
    pub limit: usize,
}

/// A page of a pool's history, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPage {
    /// The events.
    pub events: Vec<EventRecord>,
    /// More events lie beyond this page in the direction read.
    pub more: bool,
}

/// Where the pool's traffic is, if it was ever failed over or back.
pub async fn load_failover(
    store: &Store,
    pool: &str,
) -> Result<Option<FailoverRecord>, ProgressError> {
    let key = failover_key(pool);
    match store.get(&key).await? {
        Some(kv) => decode(&key, &kv.value).map(Some),
        None => Ok(None),
    }
}

/// The writes that store `record` and `events` together.
pub fn upgrade_writes(record: &UpgradeRecord, events: &[EventRecord]) -> Vec<WriteOp> {
    let pool = &record.upgrade.plan.pool;
    let mut ops = Vec::with_capacity(events.len() + 1);
    ops.push(WriteOp::Put {
        key: upgrade_key(pool),
        value: encode(record),
    });
    for e in events {
        ops.push(WriteOp::Put {
            key: event_key(pool, e.seq),
            value: encode(e),
        });
    }
    // The plan's line in the history, with the transition that ends it (written again,
    // identically, by any later store of the ended record).
    let u = &record.upgrade;
    if u.is_terminal() {
        let ended_ms = events
            .iter()
            .map(|e| e.at_ms)
            .max()
            .unwrap_or(record.started_ms);
        let summary = HistoryRecord {
            plan_id: u.plan.id.clone(),
            version: u.plan.version.clone(),
            started_by: record.started_by.clone(),
            started_ms: record.started_ms,
            ended_ms,
            outcome: u.status.name().to_owned(),
            reason: u.status.reason().unwrap_or_default().to_owned(),
            servers: u32::try_from(u.servers.len()).unwrap_or(u32::MAX),
        };
        ops.push(WriteOp::Put {
            // Plan ids are "<pool>-<start ms>": the keys sort by start time.
            key: format!("{}{}", history_prefix(pool), u.plan.id),
            value: encode(&summary),
        });
    }
    ops
}

/// The write that records where `pool`'s traffic is.
pub fn failover_write(pool: &str, record: &FailoverRecord) -> WriteOp {
    WriteOp::Put {
        key: failover_key(pool),
        value: encode(record),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_keys_sort_by_sequence() {
        let mut keys: Vec<String> = [10, 2, 100, 1].iter().map(|n| event_key("p", *n)).collect();
        keys.sort();
        assert_eq!(keys[0], "events/p/000000000001");
        assert_eq!(keys[3], "events/p/000000000100");
    }

    #[test]
    fn unreadable_values_name_their_key() {
        let err = decode::<FailoverRecord>("pools/p/failover", b"{not json").expect_err("not json");
        assert!(err.to_string().contains("pools/p/failover"), "{err}");
        assert!(!err.is_retryable());
    }
}
