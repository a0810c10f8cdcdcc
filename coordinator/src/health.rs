//! The live health model: every agent's last report, updated in place, with readiness
//! counters kept as reports arrive, so that asking a pool's readiness neither copies nor scans
//! the fleet (DESIGN.md B5).
//!
//! - **Entries in place.** One slot per server (an index from id to slot); a report rewrites
//!   its slot and moves the counters of the views it belongs to by its change only.
//! - **Views.** A view is one pool layout (pool name and its domains, as the caller's
//!   [`PoolSpec`] gives them: the configured one, or a running plan's). It is made the first
//!   time that layout is asked for (one pass over the pool) and kept: active servers per
//!   domain, the busy servers, and the active servers by the time they started serving (the
//!   stabilisation window is a range query on that, since it depends on the time asked).
//!   Layouts that stop being asked for are dropped, a few per pool at most.
//! - **The gate reads without the model's lock.** Each view's counters sit behind a lock of
//!   their own, taken by a writer only for a report that moves them (a change of state, not a
//!   heartbeat), and the views are found through a small registry with its own lock, written
//!   only when a view is made or dropped. So the upgrade's gate never waits for the stream of
//!   reports that change nothing in its pool, nor for a writer preempted while it holds the
//!   fleet's lock (B5's tail). Every state a reader sees is the state after some whole report:
//!   a view's counters move by one server's change at a time, under their lock.
//! - **Lost by silence: one queue, no scan.** A min-heap holds at most one `(seen_ms, slot)`
//!   per server. Expiring pops the entries older than `now - lost_after`: a slot heard from
//!   since goes back in at its newer time, the others flip to silent. A report only rewrites
//!   its slot (it pushes only when its slot is not queued), so the work is proportional to
//!   the reports received and the deadlines passed, never to the fleet. A read expires up
//!   to its own `now` first (cheap when nothing is due, and exact: the counters then agree
//!   with [`readiness::evaluate`] at that instant); one timer task ([`SharedHealth::expire_loop`])
//!   does the same at the earliest deadline, so that silence is flipped even when nobody reads
//!   and the queue stays bounded. The gate learns whether anything is due from the queue's
//!   oldest time, published in an atomic after each change of the queue: only when something
//!   is due does it take the model's lock to expire first. A deadline queue was chosen over a
//!   timing wheel because the key is the report time itself: `lost_after` is a reader's
//!   parameter and never needs to be known when a report arrives.
//!
//! Readiness itself stays the pure functions of [`crate::readiness`]: this module only feeds
//! them ([`readiness::conclude`] from counters, or [`readiness::evaluate`] over the entries in
//! place when an operator wants the per-server rows).

use crate::config::PoolSpec;
use crate::readiness::{
    self, AgentState, Clocks, DomainRow, HealthLookup, PoolReadiness, ServerHealth, Tally,
};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Layouts kept per pool: the configured one, a running plan's, and one being replaced.
const VIEWS_PER_POOL: usize = 3;

/// Read access whatever a panicking holder left: the counters are moved whole under the lock
/// (no step of theirs can panic half-way), so a poisoned lock still guards consistent data.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// What one server adds to the counters of the views it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Share {
    active: bool,
    busy: bool,
    /// When it started serving, while active.
    since: Option<u64>,
}

#[derive(Debug)]
struct Slot {
    id: String,
    health: Option<ServerHealth>,
    /// No report within lost_after (set by expiry, cleared by the next report).
    silent: bool,
    /// It has an entry in the expiry queue.
    queued: bool,
    /// (view, member index in that view) it counts in.
    member_of: Vec<(usize, usize)>,
    share: Share,
}

impl Slot {
    fn share(&self) -> Share {
        let Some(h) = &self.health else {
            return Share::default();
        };
        let lost = h.disconnected || self.silent;
        let active = !lost && h.state == AgentState::Serving && h.accepting;
        Share {
            active,
            busy: !lost && h.busy,
            since: if active { h.serving_since_ms } else { None },
        }
    }
}

/// A view's counters, by member (each distinct server of the layout once).
#[derive(Debug)]
struct Counters {
    active_in: Vec<usize>,
    /// Members reporting busy (and not lost).
    busy: BTreeSet<usize>,
    /// Active members by when they started serving.
    since: BTreeSet<(u64, usize)>,
    /// Each member's share as counted here (the gate reads it for servers going down
    /// without the model's slots).
    shares: Vec<Share>,
}

impl Counters {
    /// Adds (`sign`) or takes back member `m`'s `share`; `domains` are the domains that list
    /// it (once per listing, as the per-server pass counts it).
    fn count(&mut self, m: usize, domains: &[usize], share: Share, sign: bool) {
        if share.active {
            for &d in domains {
                if sign {
                    self.active_in[d] += 1;
                } else {
                    self.active_in[d] = self.active_in[d].saturating_sub(1);
                }
            }
        }
        if share.busy {
            if sign {
                self.busy.insert(m);
            } else {
                self.busy.remove(&m);
            }
        }
        if let Some(s) = share.since {
            if sign {
                self.since.insert((s, m));
            } else {
                self.since.remove(&(s, m));
            }
        }
    }

    /// Moves member `m` from `old` to `new`.
    fn reshare(&mut self, m: usize, domains: &[usize], old: Share, new: Share) {
        self.count(m, domains, old, false);
        self.count(m, domains, new, true);
        if let Some(s) = self.shares.get_mut(m) {
            *s = new;
        }
    }
}

/// One pool layout: its domains as the spec gives them, its members, and their counters. The
/// layout never changes once made; only the counters do, under their own lock.
#[derive(Debug)]
struct View {
    /// Its index in the model's views (what slots' `member_of` name).
    index: usize,
    domains: Vec<(String, Vec<String>)>,
    /// Each distinct server once: its id and the domains that list it.
    members: Vec<(String, Vec<usize>)>,
    by_id: HashMap<String, usize>,
    counters: RwLock<Counters>,
    /// When it was last asked for (a counter, for dropping the oldest).
    used: AtomicU64,
}

impl View {
    /// Readiness from the counters: no per-server rows. O(domains + busy servers + servers
    /// going down + servers stabilising), under this view's lock only.
    fn conclude(
        &self,
        spec: &PoolSpec,
        clocks: Clocks,
        going_down: &BTreeSet<String>,
        operation_running: bool,
    ) -> PoolReadiness {
        let (active_in, busy_reasons, stabilising_only) = {
            let c = read(&self.counters);
            let mut active_in = c.active_in.clone();
            let mut down = Vec::new();
            for id in going_down {
                let Some(&m) = self.by_id.get(id) else {
                    continue;
                };
                down.push(m);
                if c.shares.get(m).is_some_and(|s| s.active) {
                    for &d in &self.members[m].1 {
                        active_in[d] = active_in[d].saturating_sub(1);
                    }
                }
            }
            let mut busy_reasons: Vec<String> = c
                .busy
                .iter()
                .map(|&m| format!("{} reports busy", self.members[m].0))
                .collect();
            let stabilising_only = busy_reasons.is_empty();
            if clocks.stabilization_ms > 0 {
                // Started serving after now - stabilization: the same test as
                // readiness::stabilising.
                let from = match clocks.now_ms.checked_sub(clocks.stabilization_ms) {
                    Some(edge) => edge.saturating_add(1),
                    None => 0,
                };
                for &(_, m) in c.since.range((from, 0)..) {
                    if !c.busy.contains(&m) && !down.contains(&m) {
                        busy_reasons
                            .push(readiness::stabilising_reason(&self.members[m].0, clocks));
                    }
                }
            }
            (active_in, busy_reasons, stabilising_only)
        };
        let domains = self
            .domains
            .iter()
            .map(|(name, _)| DomainRow {
                name: name.clone(),
                ready_for_upgrade: false,
                reason: String::new(),
                servers: Vec::new(),
            })
            .collect();
        let tally = Tally {
            active_in,
            busy_reasons,
            stabilising_only,
        };
        readiness::conclude(spec, domains, tally, operation_running)
    }
}

/// What the gate reads without the model's lock: the views by pool, and whether anything is
/// due for expiry.
#[derive(Debug)]
struct Published {
    /// The oldest report time in the expiry queue (`u64::MAX` when empty), stored after each
    /// change of the queue. A stale value errs on the safe side (a pop only raises the
    /// oldest: the gate then takes the lock for nothing), except for a push older than a
    /// reader's cutoff, which the inventory makes only for a stream that broke (already not
    /// counted, so expiring it would move no counter).
    oldest: AtomicU64,
    /// The views of each pool (written under the model's lock, when one is made or dropped).
    pools: RwLock<HashMap<String, Vec<Arc<View>>>>,
    /// Stamps for `View::used`.
    uses: AtomicU64,
}

impl Default for Published {
    fn default() -> Self {
        Published {
            oldest: AtomicU64::new(u64::MAX),
            pools: RwLock::default(),
            uses: AtomicU64::new(0),
        }
    }
}

impl Published {
    /// The view of `spec`'s layout, if one is kept.
    fn find(&self, spec: &PoolSpec) -> Option<Arc<View>> {
        self.with_view(spec, Arc::clone)
    }

    /// `f` of the view of `spec`'s layout, if one is kept, under the registry's read lock
    /// (written only when a view is made or dropped): no reference count moved.
    fn with_view<R>(&self, spec: &PoolSpec, f: impl FnOnce(&Arc<View>) -> R) -> Option<R> {
        read(&self.pools)
            .get(&spec.name)?
            .iter()
            .find(|v| v.domains == spec.domains)
            .map(f)
    }

    /// Marks `view` as just asked for.
    fn stamp(&self, view: &View) {
        let n = self.uses.fetch_add(1, Ordering::Relaxed) + 1;
        view.used.store(n, Ordering::Relaxed);
    }
}

/// Every known server's last health, with the per-view counters. Not synchronised: see
/// [`SharedHealth`].
#[derive(Debug, Default)]
pub struct HealthModel {
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    deadlines: BinaryHeap<Reverse<(u64, usize)>>,
    views: Vec<Option<Arc<View>>>,
    published: Arc<Published>,
}

impl HealthLookup for HealthModel {
    fn lookup(&self, server: &str) -> Option<&ServerHealth> {
        self.get(server)
    }
}

impl HealthModel {
    /// A server's last health.
    pub fn get(&self, server: &str) -> Option<&ServerHealth> {
        self.index
            .get(server)
            .and_then(|&i| self.slots[i].health.as_ref())
    }

    /// Every server's last health (a copy: for callers that want the whole map).
    pub fn snapshot(&self) -> HashMap<String, ServerHealth> {
        self.slots
            .iter()
            .filter_map(|s| s.health.clone().map(|h| (s.id.clone(), h)))
            .collect()
    }

    fn slot(&mut self, server: &str) -> usize {
        if let Some(&i) = self.index.get(server) {
            return i;
        }
        let i = self.slots.len();
        self.slots.push(Slot {
            id: server.to_owned(),
            health: None,
            silent: false,
            queued: false,
            member_of: Vec::new(),
            share: Share::default(),
        });
        self.index.insert(server.to_owned(), i);
        i
    }

    /// Moves the counters by slot `i`'s change.
    fn reshare(&mut self, i: usize) {
        let (old, new) = (self.slots[i].share, self.slots[i].share());
        if old == new {
            return;
        }
        self.slots[i].share = new;
        for &(v, m) in &self.slots[i].member_of {
            if let Some(view) = self.views.get(v).and_then(Option::as_ref) {
                if let Some((_, domains)) = view.members.get(m) {
                    write(&view.counters).reshare(m, domains, old, new);
                }
            }
        }
    }

    /// Tells the gate the queue's oldest time (see [`Published::oldest`]).
    fn publish_oldest(&self) {
        let oldest = self.oldest().unwrap_or(u64::MAX);
        self.published.oldest.store(oldest, Ordering::Release);
    }

    /// Replaces `server`'s health (a report, or its stream breaking); returns the old one, for
    /// the caller to drop outside its lock.
    pub fn set(&mut self, server: &str, health: ServerHealth) -> Option<ServerHealth> {
        let i = self.slot(server);
        let seen = health.seen_ms;
        let slot = &mut self.slots[i];
        let old = slot.health.replace(health);
        slot.silent = false;
        if !slot.queued {
            slot.queued = true;
            self.deadlines.push(Reverse((seen, i)));
            self.publish_oldest();
        }
        self.reshare(i);
        old
    }

    /// Forgets `server`'s health (it left the fleet): its counters are taken back, and it no
    /// longer shows in the whole-fleet map. Returns the old health, for the caller to drop
    /// outside its lock.
    pub fn forget(&mut self, server: &str) -> Option<ServerHealth> {
        let &i = self.index.get(server)?;
        let old = self.slots[i].health.take();
        self.slots[i].silent = false;
        self.reshare(i);
        old
    }

    /// True when some report is older than `cutoff` and not yet expired.
    fn due(&self, cutoff: u64) -> bool {
        self.deadlines
            .peek()
            .is_some_and(|Reverse((s, _))| *s < cutoff)
    }

    /// The oldest report time still queued.
    pub fn oldest(&self) -> Option<u64> {
        self.deadlines.peek().map(|Reverse((s, _))| *s)
    }

    /// Flips to silent every server whose last report is older than `cutoff` (`now -
    /// lost_after`). Returns how many were flipped.
    pub fn expire(&mut self, cutoff: u64) -> usize {
        if !self.due(cutoff) {
            return 0;
        }
        let mut flipped = 0;
        while let Some(&Reverse((seen, i))) = self.deadlines.peek() {
            if seen >= cutoff {
                break;
            }
            self.deadlines.pop();
            let slot = &mut self.slots[i];
            slot.queued = false;
            let Some(now_seen) = slot.health.as_ref().map(|h| h.seen_ms) else {
                continue;
            };
            if slot.silent {
                continue;
            }
            if now_seen >= cutoff {
                // Heard from since it was queued: due again lost_after after that report.
                slot.queued = true;
                self.deadlines.push(Reverse((now_seen, i)));
                continue;
            }
            slot.silent = true;
            flipped += 1;
            self.reshare(i);
        }
        self.publish_oldest();
        flipped
    }

    /// The view of `spec`'s layout, made (one pass over the pool) if new.
    fn view(&mut self, spec: &PoolSpec) -> Arc<View> {
        if let Some(view) = self.published.find(spec) {
            return view;
        }
        let kept = read(&self.published.pools)
            .get(&spec.name)
            .map_or(0, Vec::len);
        if kept >= VIEWS_PER_POOL {
            self.drop_oldest_view(&spec.name);
        }
        let v = match self.views.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.views.push(None);
                self.views.len() - 1
            }
        };
        let mut members: Vec<(String, Vec<usize>)> = Vec::new();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for (d, (_, servers)) in spec.domains.iter().enumerate() {
            for server in servers {
                let m = match by_id.get(server) {
                    Some(&m) => m,
                    None => {
                        members.push((server.clone(), Vec::new()));
                        by_id.insert(server.clone(), members.len() - 1);
                        members.len() - 1
                    }
                };
                members[m].1.push(d);
            }
        }
        let mut counters = Counters {
            active_in: vec![0; spec.domains.len()],
            busy: BTreeSet::new(),
            since: BTreeSet::new(),
            shares: vec![Share::default(); members.len()],
        };
        for (m, (server, domains)) in members.iter().enumerate() {
            let i = self.slot(server);
            let slot = &mut self.slots[i];
            slot.member_of.push((v, m));
            counters.reshare(m, domains, Share::default(), slot.share);
        }
        let view = Arc::new(View {
            index: v,
            domains: spec.domains.clone(),
            members,
            by_id,
            counters: RwLock::new(counters),
            used: AtomicU64::new(0),
        });
        self.views[v] = Some(Arc::clone(&view));
        write(&self.published.pools)
            .entry(spec.name.clone())
            .or_default()
            .push(Arc::clone(&view));
        view
    }

    fn drop_oldest_view(&mut self, pool: &str) {
        let dropped = {
            let mut pools = write(&self.published.pools);
            let Some(list) = pools.get_mut(pool) else {
                return;
            };
            let Some(pos) = (0..list.len()).min_by_key(|&p| list[p].used.load(Ordering::Relaxed))
            else {
                return;
            };
            list.swap_remove(pos)
        };
        // A reader that found it just before still concludes from it: the counters as they
        // were at that instant.
        self.views[dropped.index] = None;
        for (server, _) in &dropped.members {
            if let Some(&i) = self.index.get(server) {
                self.slots[i].member_of.retain(|&(w, _)| w != dropped.index);
            }
        }
    }
}

/// The model behind a lock, as the inventory's watch tasks and the readers share it; the
/// gate's read path goes around that lock (see the module's notes).
#[derive(Debug)]
pub struct SharedHealth {
    model: RwLock<HealthModel>,
    published: Arc<Published>,
}

impl Default for SharedHealth {
    fn default() -> Self {
        let model = HealthModel::default();
        let published = Arc::clone(&model.published);
        SharedHealth {
            model: RwLock::new(model),
            published,
        }
    }
}

impl SharedHealth {
    /// Reads the model.
    pub fn read(&self) -> RwLockReadGuard<'_, HealthModel> {
        read(&self.model)
    }

    /// Changes the model.
    pub fn write(&self) -> RwLockWriteGuard<'_, HealthModel> {
        write(&self.model)
    }

    /// A pool's readiness at `clocks.now_ms`. Without `rows` it comes from the counters (the
    /// upgrade's gate: a few microseconds whatever the fleet's size, without the model's lock
    /// unless something is due for expiry or the layout is new); with `rows` the pool's own
    /// entries are read in place for the per-server view operators see.
    pub fn readiness(
        &self,
        spec: &PoolSpec,
        clocks: Clocks,
        going_down: &BTreeSet<String>,
        operation_running: bool,
        rows: bool,
    ) -> PoolReadiness {
        let cutoff = clocks.now_ms.saturating_sub(clocks.lost_after_ms);
        if rows {
            let m = self.read();
            if !m.due(cutoff) {
                return readiness::evaluate(spec, &*m, clocks, going_down, operation_running);
            }
        } else if self.published.oldest.load(Ordering::Acquire) >= cutoff {
            // Nothing to expire first: the counters are exact at this instant.
            let answer = self.published.with_view(spec, |view| {
                self.published.stamp(view);
                view.conclude(spec, clocks, going_down, operation_running)
            });
            if let Some(r) = answer {
                return r;
            }
        }
        let mut m = self.write();
        m.expire(cutoff);
        if rows {
            return readiness::evaluate(spec, &*m, clocks, going_down, operation_running);
        }
        let view = m.view(spec);
        self.published.stamp(&view);
        // Concluded under the model's lock, so that no report moves the counters between the
        // expiry and the answer (the same instant the per-server pass would see).
        let r = view.conclude(spec, clocks, going_down, operation_running);
        drop(m);
        r
    }

    /// The one timer: flips silent servers when their deadline passes, so that the queue
    /// stays short and lost-ness does not wait for a reader. Ends when `stop` is cancelled.
    pub async fn expire_loop(
        &self,
        now_ms: impl Fn() -> u64,
        lost_after: Duration,
        stop: &CancellationToken,
    ) {
        let lost_after_ms = u64::try_from(lost_after.as_millis()).unwrap_or(u64::MAX);
        loop {
            let now = now_ms();
            let cutoff = now.saturating_sub(lost_after_ms);
            let next = {
                let mut m = self.write();
                m.expire(cutoff);
                m.oldest()
            };
            // Due one ms after lost_after (the test is strictly older); at most a second, so
            // that a report arriving into an empty queue is looked at in time.
            let wait_ms = next.map_or(1_000, |s| {
                s.saturating_add(lost_after_ms + 1)
                    .saturating_sub(now)
                    .clamp(1, 1_000)
            });
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            }
        }
    }

    /// Layouts kept for `pool` (for tests).
    pub fn views_of(&self, pool: &str) -> usize {
        read(&self.published.pools).get(pool).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PoolState;

    use crate::readiness::tests::{serving as report, spec_named as spec};

    fn six() -> PoolSpec {
        spec(
            "p",
            &[
                ("ud-1", &["a", "b"]),
                ("ud-2", &["c", "d"]),
                ("ud-3", &["e", "f"]),
            ],
            4,
        )
    }

    fn clocks(now_ms: u64, stabilization_ms: u64) -> Clocks {
        Clocks {
            now_ms,
            lost_after_ms: 3_000,
            stabilization_ms,
        }
    }

    /// The counters and the per-server pass agree on state, counts and each domain.
    fn agree(h: &SharedHealth, p: &PoolSpec, c: Clocks, down: &BTreeSet<String>, op: bool) {
        let fast = h.readiness(p, c, down, op, false);
        let full = readiness::evaluate(p, &h.read().snapshot(), c, down, op);
        assert_eq!(fast.state, full.state, "{} / {}", fast.reason, full.reason);
        assert_eq!(fast.active, full.active);
        assert_eq!(fast.total, full.total);
        assert_eq!(fast.busy_only_stabilising, full.busy_only_stabilising);
        let ready = |r: &PoolReadiness| -> Vec<(bool, String)> {
            r.domains
                .iter()
                .map(|d| (d.ready_for_upgrade, d.reason.clone()))
                .collect()
        };
        assert_eq!(ready(&fast), ready(&full));
        let mut a: Vec<&str> = fast.reason.split("; ").collect();
        let mut b: Vec<&str> = full.reason.split("; ").collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    #[test]
    fn counters_agree_with_the_per_server_pass_through_a_table_of_changes() {
        let p = six();
        let h = SharedHealth::default();
        let none = BTreeSet::new();
        // Unknown servers, before any report.
        agree(&h, &p, clocks(10_000, 0), &none, false);
        for s in p.servers() {
            h.write().set(s, report(9_500));
        }
        struct Step {
            name: &'static str,
            change: fn(&mut HealthModel),
            now: u64,
            stab: u64,
            down: &'static [&'static str],
            op: bool,
            want: PoolState,
        }
        fn edit(m: &mut HealthModel, s: &str, f: fn(&mut ServerHealth)) {
            let mut x = m.get(s).cloned().unwrap_or_else(|| report(0));
            f(&mut x);
            m.set(s, x);
        }
        let steps = [
            Step {
                name: "all serving",
                change: |_| {},
                now: 10_000,
                stab: 0,
                down: &[],
                op: false,
                want: PoolState::Ready,
            },
            Step {
                name: "operation running",
                change: |_| {},
                now: 10_000,
                stab: 0,
                down: &[],
                op: true,
                want: PoolState::Busy,
            },
            Step {
                name: "c busy",
                change: |m| edit(m, "c", |x| x.busy = true),
                now: 10_000,
                stab: 0,
                down: &[],
                op: false,
                want: PoolState::Busy,
            },
            Step {
                name: "c no longer busy, e not accepting",
                change: |m| {
                    edit(m, "c", |x| x.busy = false);
                    edit(m, "e", |x| x.accepting = false);
                },
                now: 10_000,
                stab: 0,
                down: &[],
                op: false,
                want: PoolState::Ready,
            },
            Step {
                name: "a going down too: insufficient",
                change: |_| {},
                now: 10_000,
                stab: 0,
                down: &["a"],
                op: false,
                want: PoolState::InsufficientActiveFrontEnds,
            },
            Step {
                name: "e back, b stabilising",
                change: |m| {
                    edit(m, "e", |x| x.accepting = true);
                    edit(m, "b", |x| x.serving_since_ms = Some(9_000));
                },
                now: 10_000,
                stab: 5_000,
                down: &[],
                op: false,
                want: PoolState::Busy,
            },
            Step {
                name: "b stabilising but going down: not busy",
                change: |_| {},
                now: 10_000,
                stab: 5_000,
                down: &["b"],
                op: false,
                want: PoolState::Ready,
            },
            Step {
                name: "all silent but f: insufficient, by expiry alone",
                change: |m| edit(m, "f", |x| x.seen_ms = 13_000),
                now: 13_001,
                stab: 0,
                down: &[],
                op: false,
                want: PoolState::InsufficientActiveFrontEnds,
            },
            Step {
                name: "reports again: ready",
                change: |m| {
                    for s in ["a", "b", "c", "d", "e"] {
                        edit(m, s, |x| x.seen_ms = 13_000);
                    }
                },
                now: 13_001,
                stab: 0,
                down: &[],
                op: false,
                want: PoolState::Ready,
            },
            Step {
                name: "d disconnected: its domain alone may go",
                change: |m| edit(m, "d", |x| x.disconnected = true),
                now: 13_001,
                stab: 0,
                down: &[],
                op: false,
                want: PoolState::Ready,
            },
        ];
        for s in steps {
            (s.change)(&mut h.write());
            let down: BTreeSet<String> = s.down.iter().map(|x| (*x).to_owned()).collect();
            let c = clocks(s.now, s.stab);
            let r = h.readiness(&p, c, &down, s.op, false);
            assert_eq!(r.state, s.want, "{}: {}", s.name, r.reason);
            agree(&h, &p, c, &down, s.op);
        }
    }

    #[test]
    fn silence_is_expired_by_the_queue_and_a_report_revives() {
        let h = SharedHealth::default();
        let mut m = h.write();
        m.set("a", report(1_000));
        m.set("b", report(2_000));
        m.set("a", report(2_500));
        assert_eq!(
            m.deadlines.len(),
            2,
            "one queue entry per server, however many reports"
        );
        // a was heard from after its queued time: it goes back in, nothing is flipped.
        assert_eq!(m.expire(2_000), 0);
        assert_eq!(m.expire(2_001), 1);
        assert!(m.slots[m.index["b"]].silent);
        assert!(!m.slots[m.index["a"]].silent);
        m.set("b", report(4_000));
        assert!(!m.slots[m.index["b"]].silent);
        assert_eq!(m.expire(3_000), 1, "a only");
        assert_eq!(m.oldest(), Some(4_000));
    }

    #[test]
    fn a_server_that_left_is_forgotten_and_its_counters_taken_back() {
        let h = SharedHealth::default();
        let p = six();
        let c = clocks(10_000, 0);
        for s in ["a", "b", "c", "d", "e", "f"] {
            h.write().set(s, report(9_000));
        }
        let before = h.readiness(&p, c, &BTreeSet::new(), false, false);
        assert_eq!(before.active, 6);
        assert!(h.write().forget("a").is_some());
        assert!(h.write().forget("nobody").is_none());
        assert!(h.read().get("a").is_none());
        assert!(!h.read().snapshot().contains_key("a"));
        agree(&h, &p, c, &BTreeSet::new(), false);
        let after = h.readiness(&p, c, &BTreeSet::new(), false, false);
        assert_eq!(after.active, 5, "its counters were taken back");
        // Expiry skips the forgotten entry; a new report brings it back.
        assert_eq!(
            h.write().expire(9_500),
            5,
            "the five others, not the forgotten one"
        );
        for s in ["a", "b", "c", "d", "e", "f"] {
            h.write().set(s, report(9_900));
        }
        assert!(h.read().get("a").is_some());
        agree(&h, &p, c, &BTreeSet::new(), false);
        assert_eq!(h.readiness(&p, c, &BTreeSet::new(), false, false).active, 6);
    }

    #[test]
    fn layouts_are_views_of_their_own_and_old_ones_are_dropped() {
        let h = SharedHealth::default();
        for s in ["a", "b", "c", "d"] {
            h.write().set(s, report(1_000));
        }
        let c = clocks(1_000, 0);
        let none = BTreeSet::new();
        let two = spec("p", &[("x", &["a", "b"]), ("y", &["c", "d"])], 2);
        let four = spec(
            "p",
            &[("w", &["a"]), ("x", &["b"]), ("y", &["c"]), ("z", &["d"])],
            3,
        );
        assert_eq!(
            h.readiness(&two, c, &none, false, false).state,
            PoolState::Ready
        );
        assert_eq!(
            h.readiness(&four, c, &none, false, false).state,
            PoolState::Ready
        );
        assert_eq!(h.views_of("p"), 2);
        for n in 0..4 {
            let other = spec("p", &[("x", &["a", "b", "c"]), ("y", &["d"])], n);
            h.readiness(&other, c, &none, false, false);
            agree(&h, &other, c, &none, false);
        }
        assert_eq!(
            h.views_of("p"),
            3,
            "a third layout, one view whatever its min_active"
        );
        let five = spec("p", &[("v", &["a", "b", "c", "d"])], 0);
        h.readiness(&five, c, &none, false, false);
        assert_eq!(h.views_of("p"), VIEWS_PER_POOL);
        // A dropped view no longer counts a server's changes; the kept ones still do.
        h.write().set(
            "a",
            ServerHealth {
                busy: true,
                ..report(1_000)
            },
        );
        for p in [&two, &four, &five] {
            agree(&h, p, c, &none, false);
        }
    }

    #[test]
    fn the_gate_answers_while_a_writer_holds_the_model() {
        let h = std::sync::Arc::new(SharedHealth::default());
        let p = six();
        for s in p.servers() {
            h.write().set(s, report(9_500));
        }
        let c = clocks(10_000, 0);
        // The first call makes the view (under the model's lock); the next ones must not
        // need that lock at all.
        assert_eq!(
            h.readiness(&p, c, &BTreeSet::new(), false, false).state,
            PoolState::Ready
        );
        let held = h.write();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = {
            let (h, p) = (std::sync::Arc::clone(&h), p.clone());
            std::thread::spawn(move || {
                let r = h.readiness(&p, c, &BTreeSet::new(), false, false);
                let _ = tx.send(r.state);
            })
        };
        let got = rx.recv_timeout(Duration::from_secs(10));
        drop(held);
        let _ = reader.join();
        assert_eq!(
            got.ok(),
            Some(PoolState::Ready),
            "the gate waited for the model's write lock"
        );
        // Something due for expiry: the gate takes the lock and expires first.
        let late = clocks(13_000, 0);
        assert_eq!(
            h.readiness(&p, late, &BTreeSet::new(), false, false).state,
            PoolState::InsufficientActiveFrontEnds
        );
        assert_eq!(h.read().oldest(), None, "every entry expired");
    }

    #[test]
    fn counters_agree_with_the_per_server_pass_through_random_changes() {
        // A pool's configured layout and a plan's over the same servers (one more, `z`, only
        // in the plan), moved by a deterministic pseudo-random walk of reports, breaks, departures and
        // silences, asked with random servers going down and stabilisation windows.
        let base = spec(
            "p",
            &[
                ("ud-1", &["a", "b", "c"]),
                ("ud-2", &["d", "e"]),
                ("ud-3", &["f", "g", "h"]),
            ],
            4,
        );
        let plan = spec(
            "p",
            &[
                ("x", &["a", "b", "c", "d"]),
                ("y", &["e", "f", "g", "h", "z"]),
            ],
            3,
        );
        let servers = ["a", "b", "c", "d", "e", "f", "g", "h", "z", "other"];
        let h = SharedHealth::default();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut now = 10_000;
        for step in 0..2_000 {
            now += next(400);
            let s = servers[usize::try_from(next(10)).unwrap_or(0)];
            {
                let mut m = h.write();
                match next(10) {
                    0 => {
                        m.forget(s);
                    }
                    1 => {
                        let mut x = m.get(s).cloned().unwrap_or_else(|| report(now));
                        x.disconnected = true;
                        x.serving_since_ms = None;
                        m.set(s, x);
                    }
                    2 => {
                        // Silence: the clock moves on without reports.
                        now += 2_000;
                    }
                    _ => {
                        let mut x = report(now);
                        x.busy = next(5) == 0;
                        x.accepting = next(6) != 0;
                        if next(4) == 0 {
                            x.state = AgentState::Draining;
                        }
                        x.serving_since_ms = Some(now.saturating_sub(next(6_000)));
                        m.set(s, x);
                    }
                }
            }
            let down: BTreeSet<String> = servers
                .iter()
                .filter(|_| next(8) == 0)
                .map(|x| (*x).to_owned())
                .collect();
            let c = clocks(
                now,
                [0, 1_000, 5_000][usize::try_from(next(3)).unwrap_or(0)],
            );
            let op = next(10) == 0;
            for p in [&base, &plan] {
                let fast = h.readiness(p, c, &down, op, false);
                let rows = h.readiness(p, c, &down, op, true);
                assert_eq!(
                    fast.state, rows.state,
                    "step {step}: {} / {}",
                    fast.reason, rows.reason
                );
                agree(&h, p, c, &down, op);
            }
        }
    }

    #[test]
    fn concurrent_reports_never_leave_the_counters_off() {
        // Four writer threads flip the servers they own (state, accepting, busy, departures)
        // while two reader threads ask the gate over two layouts without the model's lock.
        // During a round every answer must stay within what some instant could show; after
        // it, the counters must equal the per-server pass exactly: a report lost or counted
        // twice by a race would leave them off for good.
        let base = spec(
            "p",
            &[
                ("ud-1", &["a", "b", "c", "d"]),
                ("ud-2", &["e", "f", "g", "h"]),
                ("ud-3", &["i", "j", "k", "l"]),
            ],
            6,
        );
        let plan = spec(
            "p",
            &[
                ("x", &["a", "b", "c", "d", "e", "f"]),
                ("y", &["g", "h", "i", "j", "k", "l"]),
            ],
            5,
        );
        let split = |n: usize| -> PoolSpec {
            let names = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"];
            let domains: Vec<(String, Vec<String>)> = (0..n)
                .map(|d| {
                    let members = names
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % n == d)
                        .map(|(_, s)| (*s).to_owned())
                        .collect();
                    (format!("d{d}"), members)
                })
                .collect();
            PoolSpec {
                domains,
                ..base.clone()
            }
        };
        let (two, three, four) = (split(2), split(3), split(4));
        let owned: [&[&str]; 4] = [
            &["a", "e", "i"],
            &["b", "f", "j"],
            &["c", "g", "k"],
            &["d", "h", "l"],
        ];
        let h = SharedHealth::default();
        let now = 100_000;
        let c = clocks(now, 0);
        let none = BTreeSet::new();
        for s in base.servers() {
            h.write().set(s, report(now));
        }
        for round in 0..5u64 {
            let stop = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|scope| {
                let writers: Vec<_> = owned
                    .iter()
                    .enumerate()
                    .map(|(w, servers)| {
                        let h = &h;
                        scope.spawn(move || {
                            let mut seed =
                                (round + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ w as u64;
                            let mut next = move |n: u64| {
                                seed ^= seed << 13;
                                seed ^= seed >> 7;
                                seed ^= seed << 17;
                                seed % n
                            };
                            for _ in 0..5_000 {
                                let s = servers[usize::try_from(next(3)).unwrap_or(0)];
                                let mut m = h.write();
                                if next(20) == 0 {
                                    m.forget(s);
                                    continue;
                                }
                                let mut x = report(now);
                                x.accepting = next(3) != 0;
                                x.busy = next(7) == 0;
                                if next(5) == 0 {
                                    x.state = AgentState::Draining;
                                }
                                m.set(s, x);
                            }
                        })
                    })
                    .collect();
                // The third reader cycles through layouts of its own: more than a pool keeps,
                // so views are made and dropped (slots re-pointed, indices reused) while the
                // writers move counters.
                let churn: Vec<&PoolSpec> = vec![&two, &three, &four];
                let readers: Vec<_> = [vec![&base], vec![&plan], churn]
                    .into_iter()
                    .map(|layouts| {
                        let (h, stop, none) = (&h, &stop, &none);
                        scope.spawn(move || {
                            let mut answers = 0u64;
                            while !stop.load(Ordering::Relaxed) {
                                let p = layouts[answers as usize % layouts.len()];
                                let r = h.readiness(p, c, none, false, false);
                                assert!(r.active <= r.total, "{r:?}");
                                assert_eq!(r.total, 12);
                                answers += 1;
                            }
                            answers
                        })
                    })
                    .collect();
                // Every writer joined before anything is asserted: a panic must not leave
                // the readers spinning.
                let panicked = writers.into_iter().map(|w| w.join()).any(|r| r.is_err());
                stop.store(true, Ordering::Relaxed);
                assert!(!panicked, "a writer panicked");
                for r in readers {
                    let answers = r.join().unwrap_or_else(|_| panic!("a reader panicked"));
                    assert!(answers > 0, "the gate never answered during round {round}");
                }
            });
            for p in [&base, &plan, &two, &three, &four] {
                agree(&h, p, c, &none, false);
            }
        }
    }
}
