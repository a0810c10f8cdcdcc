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
//! - **Lost by silence: one queue, no scan.** A min-heap holds at most one `(seen_ms, slot)`
//!   per server. Expiring pops the entries older than `now - lost_after`: a slot heard from
//!   since goes back in at its newer time, the others flip to silent. A report only rewrites
//!   its slot (it pushes only when its slot is not queued), so the work is proportional to
//!   the reports received and the deadlines passed, never to the fleet. A read expires up
//!   to its own `now` first (cheap when nothing is due, and exact: the counters then agree
//!   with [`readiness::evaluate`] at that instant); one timer task ([`SharedHealth::expire_loop`])
//!   does the same at the earliest deadline, so that silence is flipped even when nobody reads
//!   and the queue stays bounded. A deadline queue was chosen over a timing wheel because the
//!   key is the report time itself: `lost_after` is a reader's parameter and never needs to be
//!   known when a report arrives.
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
use std::sync::RwLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Layouts kept per pool: the configured one, a running plan's, and one being replaced.
const VIEWS_PER_POOL: usize = 3;

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
    /// (view, domain index) it counts in.
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

#[derive(Debug)]
struct View {
    domains: Vec<(String, Vec<String>)>,
    active_in: Vec<usize>,
    /// Slots reporting busy (and not lost).
    busy: BTreeSet<usize>,
    /// Active slots by when they started serving.
    since: BTreeSet<(u64, usize)>,
    /// When it was last asked for (a counter, for dropping the oldest).
    used: u64,
}

impl View {
    fn apply(&mut self, slot: usize, domain: usize, share: Share, sign: bool) {
        if share.active {
            if sign {
                self.active_in[domain] += 1;
            } else {
                self.active_in[domain] = self.active_in[domain].saturating_sub(1);
            }
        }
        if share.busy {
            if sign {
                self.busy.insert(slot);
            } else {
                self.busy.remove(&slot);
            }
        }
        if let Some(s) = share.since {
            if sign {
                self.since.insert((s, slot));
            } else {
                self.since.remove(&(s, slot));
            }
        }
    }
}

/// Every known server's last health, with the per-view counters. Not synchronised: see
/// [`SharedHealth`].
#[derive(Debug, Default)]
pub struct HealthModel {
    slots: Vec<Slot>,
    index: HashMap<String, usize>,
    deadlines: BinaryHeap<Reverse<(u64, usize)>>,
    views: Vec<Option<View>>,
    by_pool: HashMap<String, Vec<usize>>,
    uses: u64,
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
        for &(v, d) in &self.slots[i].member_of {
            if let Some(view) = self.views.get_mut(v).and_then(Option::as_mut) {
                view.apply(i, d, old, false);
                view.apply(i, d, new, true);
            }
        }
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
        flipped
    }

    fn find_view(&self, spec: &PoolSpec) -> Option<usize> {
        self.by_pool.get(&spec.name)?.iter().copied().find(|&v| {
            self.views[v]
                .as_ref()
                .is_some_and(|view| view.domains == spec.domains)
        })
    }

    /// The view of `spec`'s layout, made (one pass over the pool) if new.
    fn view(&mut self, spec: &PoolSpec) -> usize {
        if let Some(v) = self.find_view(spec) {
            return v;
        }
        let kept = self.by_pool.get(&spec.name).map_or(0, Vec::len);
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
        let mut view = View {
            domains: spec.domains.clone(),
            active_in: vec![0; spec.domains.len()],
            busy: BTreeSet::new(),
            since: BTreeSet::new(),
            used: 0,
        };
        for (d, (_, servers)) in spec.domains.iter().enumerate() {
            for server in servers {
                let i = self.slot(server);
                let slot = &mut self.slots[i];
                slot.member_of.push((v, d));
                view.apply(i, d, slot.share, true);
            }
        }
        self.views[v] = Some(view);
        self.by_pool.entry(spec.name.clone()).or_default().push(v);
        v
    }

    fn drop_oldest_view(&mut self, pool: &str) {
        let Some(list) = self.by_pool.get_mut(pool) else {
            return;
        };
        let views = &self.views;
        let Some(pos) =
            (0..list.len()).min_by_key(|&p| views[list[p]].as_ref().map_or(0, |v| v.used))
        else {
            return;
        };
        let v = list.swap_remove(pos);
        if let Some(view) = self.views[v].take() {
            for server in view.domains.iter().flat_map(|(_, s)| s) {
                if let Some(&i) = self.index.get(server) {
                    self.slots[i].member_of.retain(|&(w, _)| w != v);
                }
            }
        }
    }

    /// Readiness from view `v`'s counters: no per-server rows. O(domains + busy servers +
    /// servers going down + servers stabilising).
    fn conclude(
        &self,
        v: usize,
        spec: &PoolSpec,
        clocks: Clocks,
        going_down: &BTreeSet<String>,
        operation_running: bool,
    ) -> PoolReadiness {
        let Some(view) = self.views[v].as_ref() else {
            return readiness::evaluate(spec, self, clocks, going_down, operation_running);
        };
        let mut active_in = view.active_in.clone();
        let mut down_slots = Vec::new();
        for id in going_down {
            let Some(&i) = self.index.get(id) else {
                continue;
            };
            down_slots.push(i);
            if self.slots[i].share.active {
                for &(w, d) in &self.slots[i].member_of {
                    if w == v {
                        active_in[d] = active_in[d].saturating_sub(1);
                    }
                }
            }
        }
        let mut busy_reasons: Vec<String> = view
            .busy
            .iter()
            .map(|&i| format!("{} reports busy", self.slots[i].id))
            .collect();
        let stabilising_only = busy_reasons.is_empty();
        if clocks.stabilization_ms > 0 {
            // Started serving after now - stabilization: the same test as readiness::stabilising.
            let from = match clocks.now_ms.checked_sub(clocks.stabilization_ms) {
                Some(edge) => edge.saturating_add(1),
                None => 0,
            };
            for &(_, i) in view.since.range((from, 0)..) {
                if !view.busy.contains(&i) && !down_slots.contains(&i) {
                    busy_reasons.push(readiness::stabilising_reason(&self.slots[i].id, clocks));
                }
            }
        }
        let domains = view
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

/// The model behind a lock, as the inventory's watch tasks and the readers share it.
#[derive(Debug, Default)]
pub struct SharedHealth {
    model: RwLock<HealthModel>,
}

impl SharedHealth {
    /// Reads the model.
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, HealthModel> {
        self.model.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the model.
    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, HealthModel> {
        self.model.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A pool's readiness at `clocks.now_ms`. Without `rows` it comes from the counters (the
    /// upgrade's gate: a few microseconds whatever the fleet's size); with `rows` the pool's
    /// own entries are read in place for the per-server view operators see.
    pub fn readiness(
        &self,
        spec: &PoolSpec,
        clocks: Clocks,
        going_down: &BTreeSet<String>,
        operation_running: bool,
        rows: bool,
    ) -> PoolReadiness {
        let cutoff = clocks.now_ms.saturating_sub(clocks.lost_after_ms);
        {
            let m = self.read();
            if !m.due(cutoff) {
                if rows {
                    return readiness::evaluate(spec, &*m, clocks, going_down, operation_running);
                }
                if let Some(v) = m.find_view(spec) {
                    return m.conclude(v, spec, clocks, going_down, operation_running);
                }
            }
        }
        let mut m = self.write();
        m.expire(cutoff);
        if rows {
            return readiness::evaluate(spec, &*m, clocks, going_down, operation_running);
        }
        let v = m.view(spec);
        m.uses += 1;
        let uses = m.uses;
        if let Some(view) = m.views[v].as_mut() {
            view.used = uses;
        }
        m.conclude(v, spec, clocks, going_down, operation_running)
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
        let m = self.read();
        m.by_pool
            .get(pool)
            .map_or(0, |l| l.iter().filter(|&&v| m.views[v].is_some()).count())
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
}
