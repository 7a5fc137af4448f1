//! Delays between retries: one [`Backoff`] for discovery's sessions
//! (exponential, capped, jittered: [`Backoff::discovery`]) and the agent's
//! respawns of HAProxy (a fixed schedule, reset once HAProxy has run long
//! enough: [`Backoff::respawn`]).

use std::time::Duration;

/// How the delay grows with each attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// `first`, doubled at each attempt (at most `max_doublings` times),
    /// never above `cap`.
    Exponential {
        /// The first delay.
        first: Duration,
        /// The longest delay.
        cap: Duration,
        /// How many times the delay doubles at most (keeps the shift small).
        max_doublings: u32,
    },
    /// These delays in order, then the last one forever.
    Fixed(&'static [Duration]),
}

impl Schedule {
    /// The delay before jitter at `attempt` (0-based).
    fn delay(&self, attempt: u32) -> Duration {
        match *self {
            Schedule::Exponential { first, cap, max_doublings } => {
                first.saturating_mul(1 << attempt.min(max_doublings)).min(cap)
            }
            Schedule::Fixed(delays) => {
                let i = (attempt as usize).min(delays.len().saturating_sub(1));
                delays.get(i).copied().unwrap_or(Duration::ZERO)
            }
        }
    }
}

/// HAProxy's respawn delays: at once, then growing to 10s.
const RESPAWN: [Duration; 8] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// Successive delays between failed attempts.
#[derive(Clone, Debug)]
pub struct Backoff {
    /// How the delay grows.
    schedule: Schedule,
    /// Attempts since the last reset.
    attempt: u32,
    /// xorshift64 state when each delay is multiplied by a factor in
    /// [0.5, 1.5), so a fleet of nodes does not retry in step; `None` for
    /// exact delays.
    jitter: Option<u64>,
    /// How long a success must last before the schedule starts over
    /// ([`Backoff::reset_if_stable`]); `None` when any success resets it.
    stable_after: Option<Duration>,
}

impl Backoff {
    /// Exact delays on `schedule`, reset by [`Backoff::reset`].
    pub fn new(schedule: Schedule) -> Backoff {
        Backoff { schedule, attempt: 0, jitter: None, stable_after: None }
    }

    /// Each delay multiplied by a pseudo-random factor in [0.5, 1.5),
    /// seeded from the clock and the pid.
    pub fn with_jitter(mut self) -> Backoff {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        self.jitter = Some(seed | 1);
        self
    }

    /// The schedule starts over only after a success lasting `stable`.
    pub fn stable_after(mut self, stable: Duration) -> Backoff {
        self.stable_after = Some(stable);
        self
    }

    /// Discovery's sessions: 0.5s, 1s, 2s … up to 30s, jittered.
    pub fn discovery() -> Backoff {
        Backoff::new(Schedule::Exponential {
            first: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            max_doublings: 6,
        })
        .with_jitter()
    }

    /// HAProxy's respawns: 0, 100ms, 250ms, 500ms, 1s, 2s, 5s, then 10s;
    /// back to 0 once HAProxy ran 30s.
    pub fn respawn() -> Backoff {
        Backoff::new(Schedule::Fixed(&RESPAWN)).stable_after(Duration::from_secs(30))
    }

    /// The next delay; counts an attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.schedule.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        match &mut self.jitter {
            Some(state) => {
                // xorshift64
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                let factor = 0.5 + (*state % 1000) as f64 / 1000.0;
                base.mul_f64(factor)
            }
            None => base,
        }
    }

    /// Starts the schedule over.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Starts the schedule over if a success lasted `ran` and that is long
    /// enough ([`Backoff::stable_after`]; any success when not set).
    pub fn reset_if_stable(&mut self, ran: Duration) {
        if self.stable_after.is_none_or(|stable| ran >= stable) {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::discovery();
        let d: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(250) && d[0] < Duration::from_millis(750));
        assert!(d[9] >= Duration::from_secs(15) && d[9] < Duration::from_secs(45));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(750));
    }

    #[test]
    fn the_exponential_schedule_doubles_to_its_cap() {
        let mut b = Backoff::discovery();
        b.jitter = None;
        let d: Vec<u128> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
    }

    #[test]
    fn the_respawn_schedule_is_exact_and_resets_once_stable() {
        let mut b = Backoff::respawn();
        let d: Vec<u128> = (0..10).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(d, [0, 100, 250, 500, 1000, 2000, 5000, 10000, 10000, 10000]);
        b.reset_if_stable(Duration::from_secs(29));
        assert_eq!(b.next_delay(), Duration::from_secs(10), "not stable yet");
        b.reset_if_stable(Duration::from_secs(30));
        assert_eq!(b.next_delay(), Duration::ZERO);
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn without_stable_after_any_success_resets() {
        let mut b = Backoff::new(Schedule::Fixed(&RESPAWN));
        b.next_delay();
        b.next_delay();
        b.reset_if_stable(Duration::ZERO);
        assert_eq!(b.next_delay(), Duration::ZERO);
    }
}
