//! Time as the rest of Shoal sees it: milliseconds since the Unix epoch, read
//! through a [`Clock`] so that code deciding on time can be handed a fixed one.
//!
//! Reading the system clock is the one thing here that is not pure; the rules
//! in this crate never call it themselves, they take time as an argument.

use crate::objects::Millis;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Where the current time comes from.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> Millis;

    /// Milliseconds that never step: what ages measurements kept in memory, so that a step
    /// of the wall clock (NTP, a resumed machine) is not taken for a change of load. Near
    /// [`Clock::now_ms`], but only ever moving on at the pace of real time. A clock set by
    /// hand (tests) has nothing to step: its time.
    fn steady_ms(&self) -> Millis {
        self.now_ms()
    }
}

/// The machine's wall clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// The wall clock's reading when the process first asked, and the monotonic time since.
    fn steady_ms(&self) -> Millis {
        static START: OnceLock<(Millis, Instant)> = OnceLock::new();
        let (wall, at) = START.get_or_init(|| (self.now_ms(), Instant::now()));
        wall + at.elapsed().as_millis() as u64
    }
}

/// [`SystemClock`]'s time, for the edges (the API, the agent, the CLI) that
/// stamp what they write with the wall clock.
pub fn now_ms() -> Millis {
    SystemClock.now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_is_past_2020_and_does_not_go_back() {
        let a = now_ms();
        let b = SystemClock.now_ms();
        assert!(a > 1_577_836_800_000, "{a}");
        assert!(b >= a);
        let (c, d) = (SystemClock.steady_ms(), SystemClock.steady_ms());
        assert!(d >= c && c.abs_diff(a) < 60_000, "{a} {c}");
    }
}
