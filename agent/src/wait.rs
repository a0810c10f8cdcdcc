//! Waiting for a condition of the local service that has no event to wait on (connections
//! closed, the port accepting, health stable).
//!
//! The first look again comes after [`FIRST`], and the gap doubles up to [`CAP`]. On a local
//! service such a condition mostly comes true within a few ms of the step that causes it (nginx
//! listens before its start command returns), so it is seen within a few ms; a long wait costs
//! no more looks than a fixed [`CAP`] interval would, and is seen at most [`CAP`] late. A wait
//! never sleeps past its deadline: its last look is at the deadline.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// The first gap between two looks.
pub const FIRST: Duration = Duration::from_millis(1);

/// The longest gap between two looks (what every wait used before, as a fixed interval).
pub const CAP: Duration = Duration::from_millis(100);

/// The gaps between looks: [`FIRST`], doubling up to [`CAP`].
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// Starts at [`FIRST`].
    pub fn new() -> Backoff {
        Backoff { next: FIRST }
    }

    /// Back to [`FIRST`]: the condition changed, so the next change may come soon too.
    pub fn reset(&mut self) {
        self.next = FIRST;
    }

    /// The next gap, and grows the one after.
    pub fn next_gap(&mut self) -> Duration {
        let gap = self.next;
        self.next = (self.next * 2).min(CAP);
        gap
    }

    /// Sleeps the next gap, but not past `until`.
    pub async fn sleep(&mut self, until: Instant) {
        let gap = self.next_gap();
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(gap.min(left)).await;
    }
}

/// Looks at `check` now and then again with [`Backoff`] gaps until it is `Ok`, or `deadline`
/// has passed; then returns the last look's `Err`.
pub async fn until<T, E, F, Fut>(deadline: Instant, mut check: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new();
    loop {
        let last = check().await;
        if last.is_ok() || Instant::now() >= deadline {
            return last;
        }
        backoff.sleep(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn gaps_double_from_first_up_to_the_cap() {
        let mut b = Backoff::new();
        let gaps: Vec<u64> = (0..10).map(|_| b.next_gap().as_millis() as u64).collect();
        assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 64, 100, 100, 100]);
        b.reset();
        assert_eq!(b.next_gap(), FIRST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_condition_true_soon_is_seen_within_a_few_ms() {
        let t0 = Instant::now();
        let ready_at = t0 + Duration::from_millis(5);
        let r: Result<Duration, ()> = until(t0 + Duration::from_secs(10), || async {
            let now = Instant::now();
            if now >= ready_at {
                Ok(now - t0)
            } else {
                Err(())
            }
        })
        .await;
        // Looks at 0, 1, 3 and 7 ms: seen 2 ms after it came true (a fixed 100 ms poll: 95 ms).
        assert_eq!(r, Ok(Duration::from_millis(7)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_condition_true_at_once_needs_one_look() {
        let looks = AtomicU32::new(0);
        let r: Result<(), ()> = until(Instant::now() + Duration::from_secs(1), || async {
            looks.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await;
        assert_eq!(r, Ok(()));
        assert_eq!(looks.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_condition_is_seen_at_most_the_cap_late() {
        let t0 = Instant::now();
        let ready_at = t0 + Duration::from_millis(1234);
        let r: Result<Instant, ()> = until(t0 + Duration::from_secs(10), || async {
            let now = Instant::now();
            if now >= ready_at {
                Ok(now)
            } else {
                Err(())
            }
        })
        .await;
        let seen = r.expect("seen before the deadline");
        assert!(
            seen >= ready_at && seen - ready_at <= CAP,
            "seen {:?} late",
            seen - ready_at
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_deadline_with_the_last_look() {
        let t0 = Instant::now();
        let looks = AtomicU32::new(0);
        let r: Result<(), u32> = until(t0 + Duration::from_millis(250), || async {
            Err(looks.fetch_add(1, Ordering::Relaxed) + 1)
        })
        .await;
        // Not a gap past it (the old fixed poll could end up to 100 ms late), and few looks:
        // 0, 1, 3, 7, 15, 31, 63, 127, 227 ms, then the deadline.
        assert_eq!(Instant::now() - t0, Duration::from_millis(250));
        assert_eq!(r, Err(10));
    }
}
