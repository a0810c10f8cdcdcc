//! Wall-clock time for records read by people and other machines (journals, reports).
//! Durations and deadlines use `tokio::time::Instant`, never this.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How long from `now_ms` (wall clock) to the next beat of a grid of period `beat` shifted by
/// `offset`: more than zero, at most `beat`.
///
/// Agents send their heartbeats on this grid (the wall clock, which NTP keeps within a few ms
/// across servers) instead of `beat` after their own last report, so that a coordinator finds
/// many agents' heartbeats ready at once and reads them in one wake-up, not one wake-up each.
/// A heartbeat on the grid comes at most `beat` after the last report, never later.
pub fn until_next_beat(now_ms: u64, beat: Duration, offset: Duration) -> Duration {
    let period = u64::try_from(beat.as_millis()).unwrap_or(u64::MAX).max(1);
    let offset = u64::try_from(offset.as_millis()).unwrap_or(0) % period;
    let phase = (now_ms % period + period - offset) % period;
    Duration::from_millis(period - phase)
}

/// How many slots a heartbeat interval is cut into: each server beats in one of them, chosen by
/// a hash of its id. One slot per wake-up keeps most of the saving of beating on a grid, while a
/// coordinator of 10,000 agents meets 1,000 heartbeats at once instead of all 10,000, which
/// held up the steps it was sending meanwhile (a fleet roll-out took a quarter longer).
pub const BEAT_SLOTS: u64 = 10;

/// A server id's FNV-1a hash: stable across builds and platforms, unlike the std hasher, so a
/// server keeps its heartbeat slot across restarts and upgrades of the agent.
pub fn id_hash(server_id: &str) -> u64 {
    server_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Where in the heartbeat interval `beat` the server `server_id` beats: the start of its slot.
pub fn beat_offset(server_id: &str, beat: Duration) -> Duration {
    let slot = u32::try_from(id_hash(server_id) % BEAT_SLOTS).unwrap_or(0);
    let slots = u32::try_from(BEAT_SLOTS).unwrap_or(1);
    beat / slots * slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beats_fall_on_the_grid_and_never_wait_longer_than_a_beat() {
        let beat = Duration::from_millis(500);
        assert_eq!(until_next_beat(10_000, beat, Duration::ZERO), beat);
        assert_eq!(
            until_next_beat(10_001, beat, Duration::ZERO),
            Duration::from_millis(499)
        );
        assert_eq!(
            until_next_beat(10_499, beat, Duration::ZERO),
            Duration::from_millis(1)
        );
        // Shifted by 3 ms: the grid is 10_003, 10_503, ...
        assert_eq!(
            until_next_beat(10_000, beat, Duration::from_millis(3)),
            Duration::from_millis(3)
        );
        assert_eq!(
            until_next_beat(10_003, beat, Duration::from_millis(3)),
            beat
        );
        // Any time, any offset: in (0, beat], and the sum lands on the grid.
        for now in [0u64, 1, 499, 500, 12_345, u64::MAX] {
            for off in [0u64, 1, 250, 499, 500, 777] {
                let wait = until_next_beat(now, beat, Duration::from_millis(off));
                assert!(
                    wait > Duration::ZERO && wait <= beat,
                    "{now} {off}: {wait:?}"
                );
                let at = u128::from(now) + wait.as_millis();
                assert_eq!(at % 500, u128::from(off % 500), "{now} {off}");
            }
        }
        assert_eq!(
            until_next_beat(7, Duration::ZERO, Duration::ZERO),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn servers_spread_over_the_slots_of_a_beat() {
        let beat = Duration::from_millis(1000);
        let mut per_slot = [0u32; 10];
        for i in 0..1000 {
            let off = beat_offset(&format!("fe-{i}"), beat);
            assert!(off < beat);
            assert_eq!(
                off.as_millis() % 100,
                0,
                "{off:?} is not the start of a slot"
            );
            let slot = usize::try_from(off.as_millis() / 100).expect("small");
            per_slot[slot] += 1;
        }
        // Every slot used, none with more than twice its share.
        assert!(per_slot.iter().all(|&n| n > 0 && n < 200), "{per_slot:?}");
        assert_eq!(beat_offset("fe-1", beat), beat_offset("fe-1", beat));
    }
}
