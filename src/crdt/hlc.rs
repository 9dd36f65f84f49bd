//! Hybrid logical clock for last-writer-wins registers.
//!
//! A timestamp is `wall milliseconds << 16 | logical counter`: it follows the
//! wall clock when that moves forward and counts within a millisecond or when
//! the wall clock stalls or steps back, so a node's timestamps strictly
//! increase. Observing a remote timestamp moves the clock past it, so a write
//! made after seeing another write is ordered after it, whatever the wall
//! clocks say — unless the remote timestamp lies more than
//! [`HybridClock::MAX_DRIFT_MS`] ahead of our wall clock, in which case it is
//! merged as data but does not drag our clock into the future.

use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// A point in hybrid logical time. Ordered; unique per node.
#[derive(
    Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct HlcTimestamp(pub u64);

const LOGICAL_BITS: u32 = 16;

impl HlcTimestamp {
    /// Wall-clock milliseconds part.
    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    fn from_wall_ms(ms: u64) -> Self {
        // 48 bits of milliseconds last until the year 10889.
        HlcTimestamp(ms.min((1 << 48) - 1) << LOGICAL_BITS)
    }
}

/// Where wall-clock time comes from. The store reads time only through this,
/// so tests and the simulator can drive it.
pub trait WallClock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 reads as 0: the logical part keeps order.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// The clock state: the last timestamp issued or observed.
#[derive(Debug, Default, Clone, Copy)]
pub struct HybridClock {
    last: HlcTimestamp,
}

impl HybridClock {
    /// How far ahead of our wall clock a remote timestamp may be and still
    /// advance our clock (one minute).
    pub const MAX_DRIFT_MS: u64 = 60_000;

    /// Resumes from a persisted last timestamp.
    pub fn resume(last: HlcTimestamp) -> Self {
        HybridClock { last }
    }

    pub fn last(&self) -> HlcTimestamp {
        self.last
    }

    /// A new timestamp, strictly greater than every one issued or observed.
    pub fn tick(&mut self, wall_ms: u64) -> HlcTimestamp {
        let wall = HlcTimestamp::from_wall_ms(wall_ms);
        self.last = wall.max(HlcTimestamp(self.last.0.saturating_add(1)));
        self.last
    }

    /// Takes a timestamp seen on a remote write into account.
    pub fn observe(&mut self, remote: HlcTimestamp, wall_ms: u64) {
        let horizon = wall_ms.saturating_add(Self::MAX_DRIFT_MS);
        if remote.wall_ms() <= horizon && remote > self.last {
            self.last = remote;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_strictly_increase_when_the_wall_clock_steps_back() {
        let mut clock = HybridClock::default();
        let a = clock.tick(1_000);
        let b = clock.tick(1_000);
        let c = clock.tick(500);
        assert!(a < b && b < c);
        assert_eq!(c.wall_ms(), 1_000);
    }

    #[test]
    fn observing_a_later_remote_orders_the_next_tick_after_it() {
        let mut clock = HybridClock::default();
        let remote = HlcTimestamp::from_wall_ms(2_000);
        clock.observe(remote, 1_900);
        assert!(clock.tick(1_900) > remote);
    }

    #[test]
    fn a_remote_timestamp_far_in_the_future_does_not_drag_the_clock() {
        let mut clock = HybridClock::default();
        let far = HlcTimestamp::from_wall_ms(10_000_000);
        clock.observe(far, 1_000);
        assert!(clock.tick(1_000).wall_ms() == 1_000);
    }
}
