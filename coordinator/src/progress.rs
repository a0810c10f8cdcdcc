//! What the coordinator keeps in the store about upgrades, as typed records, and the key
//! layout: one place that knows both, so no other module builds a key or parses a value.
//!
//! Layout (relative to the store's prefix):
//!
//! | key | value | written |
//! |---|---|---|
//! | `plans/<pool>` | [`PlanRecord`]: the plan, who started it and when | once per plan |
//! | `upgrades/<pool>` | the cursor: status, domain, readiness gate, next event number | when one of them changes |
//! | `runs/<pool>/<server>` | one server's progress in its plan | when the server's progress changes in a way a new leader must know |
//! | `events/<pool>/<first seq, 12 digits>` | a batch of [`EventRecord`]s | with the next state write, or when they wait too long |
//! | `history/<pool>/<plan id>` | [`HistoryRecord`]: one line per ended plan | once, when the plan ends |
//! | `pools/<pool>/failover` | [`FailoverRecord`]: whether the pool's traffic is on its pair | on failover and failback |
//!
//! Why this shape: a transition changes one server (or a few) and the cursor, so a write
//! carries those and nothing else; what it costs does not grow with the pool. A server's chain
//! is stored when it goes down (the step that takes it down, with its attempt) and when it
//! ends, not at every step in between: a new leader sends the stored step again with the same
//! operation id, the agent answers it from its journal, and the chain's next steps follow with
//! their own deterministic ids, each answered or adopted in turn. [`Stored`] is what a driver
//! knows to be in the store, and [`upgrade_writes`] writes only the difference.
//!
//! Writes are built here as [`WriteOp`]s and applied by the caller in one fenced transaction
//! (see [`MAX_TXN_OPS`] for the rare one that must be split).

use crate::engine::{Direction, Plan, ServerPhase, ServerProgress, Step, Upgrade};
use crate::store::{KeyPage, KeyValue, Read, Store, StoreError, WriteOp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The store key of a pool's upgrade cursor.
pub fn upgrade_key(pool: &str) -> String {
    format!("upgrades/{pool}")
}

/// The store key of a pool's current plan.
pub fn plan_key(pool: &str) -> String {
    format!("plans/{pool}")
}

/// The store prefix of the servers' progress in a pool's current plan.
pub fn runs_prefix(pool: &str) -> String {
    format!("runs/{pool}/")
}

/// The store key of one server's progress.
pub fn run_key(pool: &str, server: &str) -> String {
    format!("{}{server}", runs_prefix(pool))
}

/// The store prefix of a pool's event history.
pub fn events_prefix(pool: &str) -> String {
    format!("events/{pool}/")
}

/// The store key of the batch of events whose first sequence number is `seq`.
pub fn event_key(pool: &str, seq: u64) -> String {
    format!("{}{seq:012}", events_prefix(pool))
}

/// The store key of a pool's failover flag.
pub fn failover_key(pool: &str) -> String {
    format!("pools/{pool}/failover")
}

/// The end (exclusive) of the keys under `prefix` (which ends with '/'): '0' follows '/'.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.trim_end_matches('/').to_owned();
    end.push('0');
    end
}

/// etcd refuses a transaction of more than `--max-txn-ops` operations (128 by default). A
/// write with more (a plan's first write on a large pool, or many servers changing at once)
/// is split: the servers' records first, the cursor last. The cursor names the plan, so the
/// servers of a new plan are not read before it lands; and within a plan, each server record
/// is a decision the leader already took (a server taken down after its own readiness answer),
/// so a new leader that reads some of them and not the rest resumes a state the old one
/// could have stored one at a time.
pub const MAX_TXN_OPS: usize = 100;

/// The most events one stored batch holds.
pub const MAX_EVENT_BATCH: usize = 256;

/// Events kept per pool: older batches are deleted as new ones are written.
pub const MAX_EVENTS_KEPT: u64 = 10_000;

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

/// The store prefix of fleet-wide roll-outs: `rollouts/<id>`, one key each, rewritten at
/// each pool-level change (a pool started or ended, a pause, a resume), never per server.
pub const ROLLOUTS_PREFIX: &str = "rollouts/";

/// Roll-outs kept; starting one more removes the oldest.
pub const KEEP_ROLLOUTS: usize = 100;

/// The store key of roll-out `id`.
pub fn rollout_key(id: &str) -> String {
    format!("{ROLLOUTS_PREFIX}{id}")
}

/// The write that stores `r`.
pub fn rollout_write(r: &crate::rollout::Rollout) -> WriteOp {
    WriteOp::Put {
        key: rollout_key(&r.plan.id),
        value: encode(r),
    }
}

/// Roll-out `id`, if stored.
pub async fn load_rollout(
    store: &Store,
    id: &str,
) -> Result<Option<crate::rollout::Rollout>, ProgressError> {
    let key = rollout_key(id);
    match store.get(&key).await? {
        Some(kv) => decode(&key, &kv.value).map(Some),
        None => Ok(None),
    }
}

/// The newest `limit` roll-outs' ids, oldest first.
pub async fn rollout_ids(store: &Store, limit: usize) -> Result<Vec<String>, ProgressError> {
    let page = KeyPage {
        start: ROLLOUTS_PREFIX.to_owned(),
        end: prefix_end(ROLLOUTS_PREFIX),
        limit: limit.max(1),
        from_end: true,
    };
    Ok(store
        .page(&page)
        .await?
        .into_iter()
        .filter_map(|kv| kv.key.strip_prefix(ROLLOUTS_PREFIX).map(str::to_owned))
        .collect())
}

/// The newest roll-out, if any.
pub async fn newest_rollout(
    store: &Store,
) -> Result<Option<crate::rollout::Rollout>, ProgressError> {
    let page = KeyPage {
        start: ROLLOUTS_PREFIX.to_owned(),
        end: prefix_end(ROLLOUTS_PREFIX),
        limit: 1,
        from_end: true,
    };
    match store.page(&page).await?.pop() {
        Some(kv) => decode(&kv.key, &kv.value).map(Some),
        None => Ok(None),
    }
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

/// A plan as stored, once, when it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// The plan.
    pub plan: Plan,
    /// Who started it (the caller's role, e.g. `operator/alice`).
    #[serde(default)]
    pub started_by: String,
    /// When it was started (unix ms).
    #[serde(default)]
    pub started_ms: u64,
}

/// The small part of an upgrade that changes as it moves: everything but the plan and the
/// servers' progress. Stored under short names, defaults left out (B7: it is written at every
/// domain boundary and gate change); the long names it was first stored under still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The plan this cursor belongs to (`plans/<pool>` must hold it).
    #[serde(rename = "p", alias = "plan_id")]
    pub plan_id: String,
    #[serde(rename = "s", alias = "status")]
    pub status: crate::engine::Status,
    #[serde(
        rename = "dir",
        alias = "direction",
        default = "Direction::forward",
        skip_serializing_if = "Direction::is_forward"
    )]
    pub direction: Direction,
    #[serde(rename = "d", alias = "domain_index", default)]
    pub domain_index: usize,
    #[serde(
        rename = "dp",
        alias = "domain_phase",
        default = "in_progress",
        skip_serializing_if = "is_in_progress"
    )]
    pub domain_phase: crate::engine::DomainPhase,
    #[serde(
        rename = "fo",
        alias = "failed_over",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub failed_over: bool,
    #[serde(
        rename = "ro",
        alias = "readiness_outstanding",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub readiness_outstanding: Option<usize>,
    #[serde(rename = "ra", alias = "readiness_asked", default)]
    pub readiness_asked: u64,
    #[serde(
        rename = "b",
        alias = "busy_answers",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub busy_answers: u32,
    #[serde(
        rename = "r",
        alias = "resume_count",
        default,
        skip_serializing_if = "is_zero"
    )]
    pub resume_count: u32,
    /// The sequence number the next event gets.
    #[serde(rename = "e", alias = "next_event")]
    pub next_event: u64,
}

fn in_progress() -> crate::engine::DomainPhase {
    crate::engine::DomainPhase::InProgress
}

fn is_in_progress(phase: &crate::engine::DomainPhase) -> bool {
    *phase == crate::engine::DomainPhase::InProgress
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Cursor {
    fn of(record: &UpgradeRecord) -> Cursor {
        let u = &record.upgrade;
        Cursor {
            plan_id: u.plan.id.clone(),
            status: u.status.clone(),
            direction: u.direction,
            domain_index: u.domain_index,
            domain_phase: u.domain_phase.clone(),
            failed_over: u.failed_over,
            readiness_outstanding: u.readiness_outstanding,
            readiness_asked: u.readiness_asked,
            busy_answers: u.busy_answers,
            resume_count: u.resume_count,
            next_event: record.next_event,
        }
    }

    /// Equal in everything a new leader needs. Not compared: the next event number (it moves
    /// with events, stored in their own batches; a cursor behind them is corrected on load,
    /// see [`assemble`]) and the count of readiness checks asked (it only tells one leader's
    /// answers from its earlier checks; a new leader starts from the stored count and asks
    /// anew).
    fn same_state(&self, other: &Cursor) -> bool {
        Cursor {
            next_event: other.next_event,
            readiness_asked: other.readiness_asked,
            ..self.clone()
        } == *other
    }
}

/// One server's progress, tagged with its plan: a record left by an earlier plan is not this
/// plan's (this plan never touched the server yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RunRecord {
    #[serde(rename = "p", alias = "plan_id")]
    plan_id: String,
    #[serde(flatten)]
    progress: ServerProgress,
}

/// A server this plan has not touched: what [`Upgrade::new`] starts every server with.
fn untouched() -> ServerProgress {
    ServerProgress {
        phase: ServerPhase::Pending,
        direction: Direction::Forward,
        down: false,
    }
}

/// Whether the stored progress `stored` already accounts for `now`: the same chain (direction,
/// attempt, down) further along. A new leader resends the stored step with its operation id;
/// the agent's journal answers it, and the steps after it follow with the same ids as before.
/// Prepare is not a start of such a chain (the readiness gate follows it, not a step).
pub fn accounts_for(stored: &ServerProgress, now: &ServerProgress) -> bool {
    if stored == now {
        return true;
    }
    // A prepared server is one whose prepare was sent: a new leader sends it again (it is
    // not journaled, and fetching a verified artifact again is a cache hit).
    if let (
        ServerPhase::InFlight {
            step: Step::Prepare,
            ..
        },
        ServerPhase::Prepared,
    ) = (&stored.phase, &now.phase)
    {
        return stored.direction == now.direction && stored.down == now.down;
    }
    let (
        ServerPhase::InFlight {
            step: from,
            attempt: a,
        },
        ServerPhase::InFlight {
            step: to,
            attempt: b,
        },
    ) = (&stored.phase, &now.phase)
    else {
        return false;
    };
    if a != b || stored.direction != now.direction || stored.down != now.down {
        return false;
    }
    if *from == Step::Prepare {
        return false;
    }
    let mut step = *from;
    // A chain has at most five steps after its first: the walk is bounded.
    for _ in 0..8 {
        match step.next(now.direction) {
            Some(next) if next == *to => return true,
            Some(next) => step = next,
            None => return false,
        }
    }
    false
}

/// Whether every server of `live` is accounted for by `stored` (see [`accounts_for`]) and
/// the rest of the two states is equal but for the count of readiness checks asked (see
/// [`Cursor::same_state`]): `stored` is what a new leader would resume `live` from.
pub fn state_accounts_for(stored: &Upgrade, live: &Upgrade) -> bool {
    let strip = |u: &Upgrade| Upgrade {
        servers: BTreeMap::new(),
        readiness_asked: 0,
        ..u.clone()
    };
    strip(stored) == strip(live)
        && stored.servers.len() == live.servers.len()
        && live
            .servers
            .iter()
            .all(|(s, p)| stored.servers.get(s).is_some_and(|q| accounts_for(q, p)))
}

/// What a driver knows to be in the store for its pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// The id of the plan stored at `plans/<pool>`, if it is this one.
    plan_id: Option<String>,
    cursor: Option<Cursor>,
    /// The servers' stored progress in this plan; a server missing here is untouched.
    servers: BTreeMap<String, ServerProgress>,
}

impl Stored {
    /// What is stored once `record` was read from the store (or written whole).
    pub fn of(record: &UpgradeRecord) -> Stored {
        Stored {
            plan_id: Some(record.upgrade.plan.id.clone()),
            cursor: Some(Cursor::of(record)),
            servers: record
                .upgrade
                .servers
                .iter()
                .filter(|(_, p)| **p != untouched())
                .map(|(s, p)| (s.clone(), p.clone()))
                .collect(),
        }
    }
}

/// Builds an upgrade record from its stored parts; `events_end` is one past the newest stored
/// event, if any (the cursor's count may lag behind events flushed on their own).
pub fn assemble(
    pool: &str,
    cursor: &[u8],
    plan: Option<&[u8]>,
    runs: &[(String, Vec<u8>)],
    events_end: Option<u64>,
) -> Result<UpgradeRecord, ProgressError> {
    let cursor: Cursor = decode(&upgrade_key(pool), cursor)?;
    let plan_key = plan_key(pool);
    let plan: PlanRecord = match plan {
        Some(bytes) => decode(&plan_key, bytes)?,
        None => {
            return Err(ProgressError::Unreadable {
                key: plan_key,
                message: format!("plan {} is missing", cursor.plan_id),
            })
        }
    };
    if plan.plan.id != cursor.plan_id {
        return Err(ProgressError::Unreadable {
            key: plan_key,
            message: format!(
                "holds plan {}, but the cursor is at plan {}",
                plan.plan.id, cursor.plan_id
            ),
        });
    }
    let mut servers: BTreeMap<String, ServerProgress> = plan
        .plan
        .servers()
        .map(|s| (s.clone(), untouched()))
        .collect();
    for (key, value) in runs {
        let record: RunRecord = decode(key, value)?;
        if record.plan_id != cursor.plan_id {
            continue;
        }
        let server = key.rsplit('/').next().unwrap_or_default();
        if let Some(p) = servers.get_mut(server) {
            *p = record.progress;
        }
    }
    Ok(UpgradeRecord {
        upgrade: Upgrade {
            plan: plan.plan,
            status: cursor.status,
            direction: cursor.direction,
            domain_index: cursor.domain_index,
            domain_phase: cursor.domain_phase,
            servers,
            failed_over: cursor.failed_over,
            readiness_outstanding: cursor.readiness_outstanding,
            readiness_asked: cursor.readiness_asked,
            busy_answers: cursor.busy_answers,
            resume_count: cursor.resume_count,
        },
        next_event: cursor.next_event.max(events_end.unwrap_or(0)),
        started_by: plan.started_by,
        started_ms: plan.started_ms,
    })
}

/// The pool's upgrade record, if one was ever stored.
///
/// The cursor, the plan, the servers' runs and the newest event batch are separate keys, read
/// together in one [`Store::read_all`]: a follower reading while the leader writes a new plan
/// never pairs the old cursor with the new plan.
pub async fn load_upgrade(
    store: &Store,
    pool: &str,
) -> Result<Option<UpgradeRecord>, ProgressError> {
    let mut read = store
        .read_all(&[
            Read::Key(upgrade_key(pool)),
            Read::Key(plan_key(pool)),
            Read::Prefix(runs_prefix(pool)),
            Read::Page(last_event_batch(pool)),
        ])
        .await?
        .into_iter();
    let mut next = || read.next().unwrap_or_default();
    let (cursor, plan, runs, last_batch) = (next(), next(), next(), next());
    let Some(cursor) = cursor.into_iter().next() else {
        return Ok(None);
    };
    let runs: Vec<(String, Vec<u8>)> = runs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    assemble(
        pool,
        &cursor.value,
        plan.first().map(|kv| kv.value.as_slice()),
        &runs,
        Some(next_event_after(last_batch.first())),
    )
    .map(Some)
}

/// A stored batch of events: what they share once, then each.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EventBatch {
    plan: String,
    epoch: u64,
    by: String,
    events: Vec<BatchedEvent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct BatchedEvent {
    #[serde(rename = "q")]
    seq: u64,
    #[serde(rename = "t")]
    at_ms: u64,
    #[serde(rename = "k")]
    kind: String,
    #[serde(rename = "s", default, skip_serializing_if = "String::is_empty")]
    server: String,
    #[serde(rename = "d", default, skip_serializing_if = "String::is_empty")]
    domain: String,
    #[serde(rename = "m", default, skip_serializing_if = "String::is_empty")]
    message: String,
}

/// The events of one stored batch (`key` names it in an error).
pub fn decode_events(key: &str, value: &[u8]) -> Result<Vec<EventRecord>, ProgressError> {
    Ok(EventBatch::decode(key, value)?.records().collect())
}

impl EventBatch {
    /// JSON, packed by [`crate::history_codec`] (deflated against a dictionary of what
    /// batches hold) when that is shorter: the history is most of the bytes an upgrade
    /// writes (B7).
    fn encode(&self) -> Vec<u8> {
        crate::history_codec::pack(encode(self))
    }

    fn decode(key: &str, value: &[u8]) -> Result<EventBatch, ProgressError> {
        let json =
            crate::history_codec::unpack(value).map_err(|message| ProgressError::Unreadable {
                key: key.to_string(),
                message,
            })?;
        decode(key, &json)
    }

    fn records(self) -> impl Iterator<Item = EventRecord> {
        let (plan, epoch, by) = (self.plan, self.epoch, self.by);
        self.events.into_iter().map(move |e| EventRecord {
            seq: e.seq,
            at_ms: e.at_ms,
            plan_id: plan.clone(),
            epoch,
            coordinator: by.clone(),
            kind: e.kind,
            server: e.server,
            domain: e.domain,
            message: e.message,
        })
    }
}

/// The writes that store `events` (all of one pool, in order), in batches, and cut the
/// pool's history to the newest [`MAX_EVENTS_KEPT`]. Events of different plans, epochs or
/// coordinators go in different batches.
pub fn events_writes(pool: &str, events: &[EventRecord]) -> Vec<WriteOp> {
    let events = fold_step_starts(events);
    let events = events.as_slice();
    let mut ops = Vec::new();
    let mut batch: Option<EventBatch> = None;
    let flush = |b: EventBatch, ops: &mut Vec<WriteOp>| {
        if let Some(first) = b.events.first() {
            ops.push(WriteOp::Put {
                key: event_key(pool, first.seq),
                value: b.encode(),
            });
        }
    };
    for e in events {
        let fits = batch.as_ref().is_some_and(|b| {
            b.plan == e.plan_id
                && b.epoch == e.epoch
                && b.by == e.coordinator
                && b.events.len() < MAX_EVENT_BATCH
        });
        if !fits {
            if let Some(b) = batch.take() {
                flush(b, &mut ops);
            }
        }
        batch
            .get_or_insert_with(|| EventBatch {
                plan: e.plan_id.clone(),
                epoch: e.epoch,
                by: e.coordinator.clone(),
                events: Vec::new(),
            })
            .events
            .push(BatchedEvent {
                seq: e.seq,
                at_ms: e.at_ms,
                kind: e.kind.clone(),
                server: e.server.clone(),
                domain: e.domain.clone(),
                message: e.message.clone(),
            });
    }
    if let Some(b) = batch {
        flush(b, &mut ops);
    }
    // Whole batches that start more than MAX_EVENTS_KEPT before the newest event go. The
    // cut-off lies before every batch written here (a batch holds fewer events than are
    // kept), so the delete never overlaps a put of the same transaction (etcd refuses that).
    if let Some(first) = events.first() {
        let newest = events.last().map_or(first.seq, |e| e.seq);
        let keep_from = newest.saturating_add(1).saturating_sub(MAX_EVENTS_KEPT);
        if keep_from > 0 && keep_from <= first.seq {
            ops.push(WriteOp::DeleteRange {
                start: events_prefix(pool),
                end: event_key(pool, keep_from),
            });
        }
    }
    ops
}

/// Drops each `step_started` whose step's outcome (`step_succeeded`, `step_failed`, ...) for
/// the same server is among `events` after it: stored together, the outcome says it all (its
/// message names the step and attempt, and the operation id follows from them). A step still
/// running keeps its start in history. Sequence numbers keep their gaps.
fn fold_step_starts(events: &[EventRecord]) -> Vec<EventRecord> {
    let mut ended = std::collections::BTreeSet::new();
    let mut keep = vec![true; events.len()];
    for (i, e) in events.iter().enumerate().rev() {
        let step = e.message.split_whitespace().next().unwrap_or_default();
        if e.kind == "step_started" {
            if ended.remove(&(e.server.as_str(), step)) {
                keep[i] = false;
            }
        } else if e.kind.starts_with("step_") && !e.server.is_empty() {
            ended.insert((e.server.as_str(), step));
        }
    }
    events
        .iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .map(|(e, _)| e.clone())
        .collect()
}

/// The next event number for a pool: one past the last stored event, so that a new plan (or
/// a cursor that lags behind events flushed on their own) never overwrites history.
pub async fn next_event_after_history(store: &Store, pool: &str) -> Result<u64, ProgressError> {
    let last = store.page(&last_event_batch(pool)).await?;
    Ok(next_event_after(last.first()))
}

/// The read of a pool's newest event batch.
fn last_event_batch(pool: &str) -> KeyPage {
    let prefix = events_prefix(pool);
    KeyPage {
        end: prefix_end(&prefix),
        start: prefix,
        limit: 1,
        from_end: true,
    }
}

/// The sequence number after `last`, the pool's newest event batch (0: no history).
fn next_event_after(last: Option<&KeyValue>) -> u64 {
    match last {
        // An unreadable batch still tells where it started.
        Some(kv) => match EventBatch::decode(&kv.key, &kv.value) {
            Ok(b) => b.events.last().map_or(0, |e| e.seq.saturating_add(1)),
            Err(_) => kv
                .key
                .rsplit('/')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .map_or(0, |n| n.saturating_add(1)),
        },
        None => 0,
    }
}

/// Batches read per store call while paging through history.
const BATCHES_PER_READ: usize = 32;

/// A page of a pool's events (see [`EventRange`]). Unreadable batches are skipped.
pub async fn load_events(
    store: &Store,
    pool: &str,
    range: EventRange,
) -> Result<EventPage, ProgressError> {
    let prefix = events_prefix(pool);
    let limit = range.limit.clamp(1, MAX_EVENTS_PAGE);
    let after = range.after;
    let before = range.before.unwrap_or(u64::MAX);
    if after.is_some_and(|a| a >= MAX_EVENT_SEQ) || before == 0 {
        return Ok(EventPage {
            events: Vec::new(),
            more: false,
        });
    }
    let wanted = |seq: u64| seq < before && after.is_none_or(|a| seq > a);
    let decoded = |kvs: Vec<crate::store::KeyValue>| -> Vec<EventRecord> {
        kvs.into_iter()
            .filter_map(|kv| EventBatch::decode(&kv.key, &kv.value).ok())
            .flat_map(EventBatch::records)
            .collect()
    };
    let batch_end = if before > MAX_EVENT_SEQ {
        prefix_end(&prefix)
    } else {
        event_key(pool, before)
    };
    let mut got: Vec<EventRecord> = Vec::new();
    match after {
        Some(a) => {
            // Forward from `a`: the batch holding a + 1 may start at or before it.
            let holding = store
                .page(&KeyPage {
                    start: prefix.clone(),
                    end: event_key(pool, a + 1),
                    limit: 1,
                    from_end: true,
                })
                .await?;
            got.extend(decoded(holding).into_iter().filter(|e| wanted(e.seq)));
            let mut start = event_key(pool, a + 1);
            while got.len() <= limit {
                let kvs = store
                    .page(&KeyPage {
                        start: start.clone(),
                        end: batch_end.clone(),
                        limit: BATCHES_PER_READ,
                        from_end: false,
                    })
                    .await?;
                let n = kvs.len();
                if let Some(last) = kvs.last() {
                    start = format!("{}\0", last.key);
                }
                got.extend(decoded(kvs).into_iter().filter(|e| wanted(e.seq)));
                if n < BATCHES_PER_READ {
                    break;
                }
            }
            got.sort_by_key(|e| e.seq);
            got.dedup_by_key(|e| e.seq);
            let more = got.len() > limit;
            got.truncate(limit);
            Ok(EventPage { events: got, more })
        }
        None => {
            // Back from `before`: batches are read newest first until the page is full. The
            // batch holding before - 1 starts before it, so the range ends at the key of
            // `before` itself.
            let mut end = batch_end;
            loop {
                let kvs = store
                    .page(&KeyPage {
                        start: prefix.clone(),
                        end: end.clone(),
                        limit: BATCHES_PER_READ,
                        from_end: true,
                    })
                    .await?;
                let n = kvs.len();
                if let Some(first) = kvs.first() {
                    end = first.key.clone();
                }
                got.extend(decoded(kvs).into_iter().filter(|e| wanted(e.seq)));
                if got.len() > limit || n < BATCHES_PER_READ {
                    break;
                }
            }
            got.sort_by_key(|e| e.seq);
            got.dedup_by_key(|e| e.seq);
            let more = got.len() > limit;
            let cut = got.len().saturating_sub(limit);
            Ok(EventPage {
                events: got.split_off(cut),
                more,
            })
        }
    }
}

/// `page` (read with `range`) with the leader's records not stored yet that fall in `range`.
pub fn merge_pending(page: EventPage, pending: Vec<EventRecord>, range: EventRange) -> EventPage {
    if pending.is_empty() {
        return page;
    }
    let limit = range.limit.clamp(1, MAX_EVENTS_PAGE);
    let before = range.before.unwrap_or(u64::MAX);
    let mut all = page.events;
    all.extend(
        pending
            .into_iter()
            .filter(|e| e.seq < before && range.after.is_none_or(|a| e.seq > a)),
    );
    all.sort_by_key(|e| e.seq);
    all.dedup_by_key(|e| e.seq);
    let more = page.more || all.len() > limit;
    if range.after.is_some() {
        all.truncate(limit);
    } else {
        let cut = all.len().saturating_sub(limit);
        all.drain(..cut);
    }
    EventPage { events: all, more }
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

/// A state write: the transactions to apply in order, and what is stored once they are.
#[derive(Debug, Clone, Default)]
pub struct Writes {
    /// One transaction each (usually one; see [`MAX_TXN_OPS`]). Empty: nothing to write.
    pub txns: Vec<Vec<WriteOp>>,
    /// What is stored once every transaction is applied.
    pub stored: Stored,
}

/// The writes that bring the store from `stored` to `record`, plus `events`: only what a new
/// leader needs and does not have (see the module docs), and the plan's line in the history
/// once it ends. `with_events` = false leaves the events for a later write when the state
/// itself needs none.
pub fn upgrade_writes(stored: &Stored, record: &UpgradeRecord, events: &[EventRecord]) -> Writes {
    let u = &record.upgrade;
    let pool = &u.plan.pool;
    let new_plan = stored.plan_id.as_deref() != Some(u.plan.id.as_str());
    let mut next = if new_plan {
        Stored {
            plan_id: Some(u.plan.id.clone()),
            cursor: None,
            servers: BTreeMap::new(),
        }
    } else {
        stored.clone()
    };
    let mut servers_ops = Vec::new();
    // The plan goes with the cursor that names it: when a write is too big for one
    // transaction and only its first ones land (a leader dies in between), the store still
    // holds the previous plan with its own cursor (the new plan's runs, tagged with its id,
    // are not the old plan's), not a new plan under an old cursor, which reads as unreadable.
    let plan_op = new_plan.then(|| WriteOp::Put {
        key: plan_key(pool),
        value: encode(&PlanRecord {
            plan: u.plan.clone(),
            started_by: record.started_by.clone(),
            started_ms: record.started_ms,
        }),
    });
    for (server, now) in &u.servers {
        let before = next.servers.get(server).cloned().unwrap_or_else(untouched);
        if accounts_for(&before, now) {
            continue;
        }
        servers_ops.push(WriteOp::Put {
            key: run_key(pool, server),
            value: encode(&RunRecord {
                plan_id: u.plan.id.clone(),
                progress: now.clone(),
            }),
        });
        next.servers.insert(server.clone(), now.clone());
    }
    let cursor = Cursor::of(record);
    let cursor_changed = next.cursor.as_ref().is_none_or(|c| !c.same_state(&cursor));
    let state_changed = cursor_changed || !servers_ops.is_empty();
    let mut last: Vec<WriteOp> = plan_op.into_iter().collect();
    // A transition that only moves servers (a take-down carrying the previous server's done)
    // leaves the cursor alone: what it would change there (the next event number, the count of
    // readiness checks) a new leader does not need (see [`Cursor::same_state`]).
    if cursor_changed {
        last.push(WriteOp::Put {
            key: upgrade_key(pool),
            value: encode(&cursor),
        });
        next.cursor = Some(cursor);
    }
    last.extend(events_writes(pool, events));
    // The plan's line in the history, with the transition that ends it (written again,
    // identically, by any later store of the ended record).
    if u.is_terminal() && state_changed {
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
        last.push(WriteOp::Put {
            // Plan ids are "<pool>-<start ms>": the keys sort by start time.
            key: format!("{}{}", history_prefix(pool), u.plan.id),
            value: encode(&summary),
        });
    }
    let mut txns = Vec::new();
    if servers_ops.len() + last.len() <= MAX_TXN_OPS {
        servers_ops.extend(last);
        if !servers_ops.is_empty() {
            txns.push(servers_ops);
        }
    } else {
        txns.extend(servers_ops.chunks(MAX_TXN_OPS).map(<[WriteOp]>::to_vec));
        txns.extend(last.chunks(MAX_TXN_OPS).map(<[WriteOp]>::to_vec));
    }
    Writes { txns, stored: next }
}

/// Whether the upgrade's cursor (status, direction, domain, gate) moved since `stored`.
pub fn cursor_changed(stored: &Stored, record: &UpgradeRecord) -> bool {
    stored.plan_id.as_deref() != Some(record.upgrade.plan.id.as_str())
        || stored
            .cursor
            .as_ref()
            .is_none_or(|c| !c.same_state(&Cursor::of(record)))
}

/// Whether `record` differs from `stored` in anything a new leader needs.
pub fn needs_write(stored: &Stored, record: &UpgradeRecord) -> bool {
    upgrade_writes(stored, record, &[])
        .txns
        .iter()
        .any(|t| !t.is_empty())
}

/// The writes that store `record` whole, as if nothing were stored (a test, or a tool that
/// plants a state).
pub fn full_writes(record: &UpgradeRecord) -> Vec<WriteOp> {
    upgrade_writes(&Stored::default(), record, &[])
        .txns
        .concat()
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

    fn plan(pool: &str, servers: usize) -> Plan {
        let domains: Vec<serde_json::Value> = (0..3)
            .map(|d| {
                let names: Vec<String> = (0..servers)
                    .filter(|i| i % 3 == d)
                    .map(|i| format!("fe-{i:04}"))
                    .collect();
                serde_json::json!({"name": format!("ud-{d}"), "servers": names})
            })
            .collect();
        let json = serde_json::json!({
            "id": format!("{pool}-1700000000000"), "pool": pool, "version": "2.0",
            "artifact": "https://repo/app-2.0.tar.gz", "sha256": "ab".repeat(32),
            "drain": {"graceful": {"timeout": "5m"}}, "verify_stable": "10s",
            "verify_timeout": "2m", "domains": domains,
        });
        serde_json::from_value(json).expect("a valid plan")
    }

    fn record(pool: &str, servers: usize) -> UpgradeRecord {
        let (upgrade, _) = Upgrade::new(plan(pool, servers)).expect("valid");
        UpgradeRecord {
            upgrade,
            next_event: 7,
            started_by: "operator/alice".into(),
            started_ms: 1_700_000_000_000,
        }
    }

    fn in_flight(step: Step, attempt: u32, down: bool) -> ServerProgress {
        ServerProgress {
            phase: ServerPhase::InFlight { step, attempt },
            direction: Direction::Forward,
            down,
        }
    }

    /// Applies writes to a map, as a store would.
    fn apply(kv: &mut BTreeMap<String, Vec<u8>>, txns: &[Vec<WriteOp>]) {
        for op in txns.iter().flatten() {
            match op {
                WriteOp::Put { key, value } => {
                    kv.insert(key.clone(), value.clone());
                }
                WriteOp::Delete { key } => {
                    kv.remove(key);
                }
                WriteOp::DeleteRange { start, end } => {
                    kv.retain(|k, _| !(k >= start && k < end));
                }
            }
        }
    }

    fn load(kv: &BTreeMap<String, Vec<u8>>, pool: &str) -> UpgradeRecord {
        let runs: Vec<(String, Vec<u8>)> = kv
            .iter()
            .filter(|(k, _)| k.starts_with(&runs_prefix(pool)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assemble(
            pool,
            &kv[&upgrade_key(pool)],
            kv.get(&plan_key(pool)).map(Vec::as_slice),
            &runs,
            None,
        )
        .expect("assembles")
    }

    #[test]
    fn a_chain_is_accounted_for_by_the_step_that_took_the_server_down() {
        let drain = in_flight(Step::Drain, 1, true);
        assert!(accounts_for(&drain, &in_flight(Step::Install, 1, true)));
        assert!(accounts_for(&drain, &in_flight(Step::Verify, 1, true)));
        // Another attempt, the gate after prepare, a step back, a changed flag: written.
        assert!(!accounts_for(&drain, &in_flight(Step::Install, 2, true)));
        assert!(!accounts_for(
            &in_flight(Step::Prepare, 1, false),
            &in_flight(Step::Drain, 1, true)
        ));
        assert!(!accounts_for(&in_flight(Step::Restart, 1, true), &drain));
        assert!(!accounts_for(&drain, &in_flight(Step::Install, 1, false)));
        let backward = ServerProgress {
            direction: Direction::Backward,
            ..in_flight(Step::Rollback, 1, true)
        };
        assert!(!accounts_for(&drain, &backward));
        let done = ServerProgress {
            phase: ServerPhase::Done,
            direction: Direction::Forward,
            down: false,
        };
        assert!(!accounts_for(&drain, &done));
    }

    #[test]
    fn what_is_written_reads_back_and_a_server_costs_the_same_in_any_pool() {
        let mut cost = Vec::new();
        for servers in [6, 300] {
            let mut r = record("pool-a", servers);
            let mut kv = BTreeMap::new();
            let first = upgrade_writes(&Stored::default(), &r, &[]);
            apply(&mut kv, &first.txns);
            assert_eq!(load(&kv, "pool-a"), r, "{servers} servers");
            let mut stored = first.stored;

            // The server goes down: one small write.
            r.upgrade
                .servers
                .insert("fe-0000".into(), in_flight(Step::Drain, 1, true));
            r.upgrade.readiness_asked += 1;
            let down = upgrade_writes(&stored, &r, &[]);
            assert_eq!(down.txns.len(), 1);
            let bytes: usize = down.txns[0]
                .iter()
                .map(|op| match op {
                    WriteOp::Put { key, value } => key.len() + value.len(),
                    _ => 0,
                })
                .sum();
            cost.push(bytes);
            // Only the server's key: the cursor did not move in anything a new leader needs
            // (the count of readiness checks stays as stored).
            assert!(
                down.txns[0].iter().all(|op| matches!(
                    op,
                    WriteOp::Put { key, .. } if key == &run_key("pool-a", "fe-0000")
                )),
                "{:?}",
                down.txns[0]
            );
            apply(&mut kv, &down.txns);
            stored = down.stored;
            let mut expected = r.clone();
            expected.upgrade.readiness_asked -= 1;
            assert_eq!(load(&kv, "pool-a"), expected);

            // Its chain goes on: nothing to write; the store still accounts for it.
            let before = r.clone();
            r.upgrade
                .servers
                .insert("fe-0000".into(), in_flight(Step::Restart, 1, true));
            assert!(!needs_write(&stored, &r));
            assert!(state_accounts_for(&load(&kv, "pool-a").upgrade, &r.upgrade));
            assert!(state_accounts_for(&before.upgrade, &r.upgrade));

            // A new plan replaces the old servers' progress without deleting it.
            let mut next = record("pool-a", servers);
            next.upgrade.plan.id = "pool-a-1800000000000".into();
            let new_plan = upgrade_writes(&stored, &next, &[]);
            apply(&mut kv, &new_plan.txns);
            assert_eq!(load(&kv, "pool-a"), next);
        }
        assert_eq!(
            cost[0], cost[1],
            "bytes to take a server down, 6 vs 300 servers"
        );
        assert!(cost[0] < 150, "{} bytes to take a server down", cost[0]);
    }

    #[test]
    fn a_write_too_big_for_one_transaction_lands_servers_first_and_cursor_last() {
        let mut r = record("pool-a", 600);
        let stored = upgrade_writes(&Stored::default(), &r, &[]).stored;
        for (i, p) in r.upgrade.servers.values_mut().enumerate() {
            if i % 2 == 0 {
                *p = in_flight(Step::Prepare, 1, false);
            }
        }
        r.upgrade.status = crate::engine::Status::Paused { reason: "x".into() };
        let w = upgrade_writes(&stored, &r, &[]);
        assert!(w.txns.len() > 1);
        assert!(w.txns.iter().all(|t| t.len() <= MAX_TXN_OPS));
        let last = w.txns.last().expect("some");
        assert!(
            matches!(&last[0], WriteOp::Put { key, .. } if *key == upgrade_key("pool-a")),
            "the cursor comes last"
        );
    }

    #[test]
    fn a_new_plan_cut_between_its_transactions_leaves_the_previous_one_readable() {
        // A completed plan of 600 servers is stored.
        let mut old = record("pool-a", 600);
        for p in old.upgrade.servers.values_mut() {
            p.phase = ServerPhase::Done;
        }
        old.upgrade.status = crate::engine::Status::Completed;
        let mut kv = BTreeMap::new();
        apply(&mut kv, &upgrade_writes(&Stored::default(), &old, &[]).txns);
        let stored = upgrade_writes(&Stored::default(), &old, &[]).stored;
        // A new plan launches 300 of them in its first write: more than one transaction.
        let mut new = record("pool-a", 600);
        new.upgrade.plan.id = "pool-a-1800000000000".into();
        for (i, p) in new.upgrade.servers.values_mut().enumerate() {
            if i % 2 == 0 {
                *p = in_flight(Step::Prepare, 1, false);
            }
        }
        let w = upgrade_writes(&stored, &new, &[]);
        assert!(w.txns.len() > 1, "{} transactions", w.txns.len());
        // The leader dies before the last transaction: the old plan still reads, whole where
        // the new one did not touch it.
        let (last, first) = w.txns.split_last().expect("some");
        apply(&mut kv, first);
        let seen = load(&kv, "pool-a");
        assert_eq!(seen.upgrade.plan.id, old.upgrade.plan.id);
        assert!(seen.upgrade.is_terminal());
        // Then it lands: the new plan reads.
        apply(&mut kv, std::slice::from_ref(last));
        assert_eq!(load(&kv, "pool-a"), new);
    }

    #[test]
    fn events_are_written_in_batches_and_old_ones_are_cut() {
        let event = |seq: u64, epoch: u64| EventRecord {
            seq,
            at_ms: seq,
            plan_id: "p".into(),
            epoch,
            coordinator: "c1".into(),
            kind: "step_succeeded".into(),
            server: "fe-1".into(),
            domain: String::new(),
            message: "ok".into(),
        };
        let events: Vec<EventRecord> = (0..600).map(|q| event(q, 1 + q / 500)).collect();
        let ops = events_writes("p", &events);
        let puts: Vec<&String> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Put { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        // 256 + 244 (epoch 1), then 100 (epoch 2).
        assert_eq!(
            puts,
            [
                &event_key("p", 0),
                &event_key("p", 256),
                &event_key("p", 500)
            ]
        );
        let mut back = Vec::new();
        for op in &ops {
            if let WriteOp::Put { key, value } = op {
                back.extend(decode_events(key, value).expect("decodes"));
            }
        }
        assert_eq!(back, events);
        assert!(!ops
            .iter()
            .any(|op| matches!(op, WriteOp::DeleteRange { .. })));
        let late = events_writes("p", &[event(MAX_EVENTS_KEPT + 41, 3)]);
        assert_eq!(
            late.last(),
            Some(&WriteOp::DeleteRange {
                start: events_prefix("p"),
                end: event_key("p", 42)
            })
        );
    }

    #[test]
    fn event_batches_are_stored_deflated_and_older_json_batches_still_read() {
        let events: Vec<EventRecord> = (0..30)
            .map(|q| EventRecord {
                seq: q,
                at_ms: 1_800_000_000_000 + q,
                plan_id: "pool-a-1800000000000".into(),
                epoch: 4,
                coordinator: "c1".into(),
                kind: "step_succeeded".into(),
                server: format!("fe-{:04}", q / 6),
                domain: "ud-1".into(),
                message: format!("install succeeded (attempt 1): installed version 2.0 ({q})"),
            })
            .collect();
        let ops = events_writes("pool-a", &events);
        let Some(WriteOp::Put { key, value }) = ops.first() else {
            panic!("no batch written: {ops:?}");
        };
        let batch = EventBatch::decode(key, value).expect("reads back");
        let json = encode(&batch);
        assert_eq!(value[0], crate::history_codec::DEFLATED_DICT_1);
        assert!(
            value.len() * 3 < json.len(),
            "{} bytes deflated against {} in JSON",
            value.len(),
            json.len()
        );
        assert_eq!(decode_events(key, value).expect("deflated"), events);
        // A batch written as JSON (before batches were deflated) reads the same.
        assert_eq!(decode_events(key, &json).expect("JSON"), events);
        // A damaged one is unreadable, named by its key.
        let mut bad = value.clone();
        bad.truncate(bad.len() / 2);
        let err = decode_events(key, &bad).expect_err("cut in half");
        assert!(err.to_string().contains(key.as_str()), "{err}");
    }

    #[test]
    fn run_records_are_short_and_the_long_form_still_reads() {
        let down = RunRecord {
            plan_id: "pool-a-1800000000000".into(),
            progress: in_flight(Step::Drain, 1, true),
        };
        let json = String::from_utf8(encode(&down)).expect("utf-8");
        // 112 bytes with the long names.
        assert!(json.len() <= 90, "{} bytes: {json}", json.len());
        assert_eq!(
            decode::<RunRecord>("runs/pool-a/fe-1", json.as_bytes()).expect("reads"),
            down
        );
        // As first stored, with the long names.
        let long = r#"{"plan_id":"pool-a-1800000000000","phase":{"in_flight":{"step":"drain","attempt":1}},"direction":"forward","down":true}"#;
        assert_eq!(
            decode::<RunRecord>("runs/pool-a/fe-1", long.as_bytes()).expect("reads"),
            down
        );
        let back = RunRecord {
            plan_id: "pool-a-1800000000000".into(),
            progress: ServerProgress {
                phase: ServerPhase::Done,
                direction: Direction::Backward,
                down: false,
            },
        };
        let json = encode(&back);
        assert_eq!(
            decode::<RunRecord>("runs/pool-a/fe-1", &json).expect("reads"),
            back
        );
    }

    #[test]
    fn unreadable_values_name_their_key() {
        let err = decode::<FailoverRecord>("pools/p/failover", b"{not json").expect_err("not json");
        assert!(err.to_string().contains("pools/p/failover"), "{err}");
        assert!(!err.is_retryable());
    }
}
