//! `CircuitBreaker`: a pure state machine around model execution, handed the time.
//!
//! `threshold` consecutive failed steps open it. While open, no model step runs and new requests
//! are refused at once (the caller answers 503 with the remaining cool-down as `Retry-After`);
//! requests already queued or running are held, not failed. When the cool-down is over it is
//! half-open: the next step is a probe. A probe that succeeds closes it; one that fails opens it
//! again for another cool-down.
//!
//! ```text
//!            threshold failures              cool-down over
//!   Closed ───────────────────────▶ Open ─────────────────────▶ HalfOpen
//!     ▲                              ▲                             │
//!     │         probe succeeds       │       probe fails           │
//!     └──────────────────────────────┼─────────────────────────────┤
//!                                    └─────────────────────────────┘
//! ```

use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};

/// When the breaker opens, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed steps that open the breaker (at least 1).
    pub threshold: u32,
    /// How long it stays open before a probe step may run.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self { threshold: 3, cooldown: Duration::from_secs(10) }
    }
}

impl BreakerConfig {
    /// Checks the values: a threshold of at least 1 and a cool-down longer than 0.
    pub fn validate(&self) -> Result<()> {
        if self.threshold == 0 {
            return Err(EngineError::InvalidRequest("`breaker_threshold` must be at least 1".into()));
        }
        if self.cooldown.is_zero() {
            return Err(EngineError::InvalidRequest("`breaker_cooldown` must be longer than 0".into()));
        }
        Ok(())
    }
}

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BreakerState {
    /// Steps run; failures are counted.
    #[default]
    Closed,
    /// Steps are held and new requests refused until `until`.
    Open {
        /// End of the cool-down.
        until: Instant,
    },
    /// The cool-down is over; the next step is the probe.
    HalfOpen,
}

impl BreakerState {
    /// The remaining cool-down when the breaker is open at `now`; `None` when requests may come in
    /// (closed, half-open, or open with its cool-down over and the probe about to run).
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match *self {
            Self::Open { until } if until > now => Some(until - now),
            _ => None,
        }
    }

    /// The state's name in metrics and health answers: `closed`, `open` or `half_open`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open { .. } => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// The breaker: its state and the count of consecutive failed steps.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self { config, state: BreakerState::Closed, consecutive_failures: 0 }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Consecutive failed steps since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Moves to half-open once the cool-down is over. Returns the new state when it changed.
    pub fn poll(&mut self, now: Instant) -> Option<BreakerState> {
        match self.state {
            BreakerState::Open { until } if now >= until => self.set(BreakerState::HalfOpen),
            _ => None,
        }
    }

    /// While open: the time until which no step may run. Call [`CircuitBreaker::poll`] first.
    pub fn held_until(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Records a step that ran. Returns the new state when it changed (a probe closed it).
    pub fn on_success(&mut self) -> Option<BreakerState> {
        self.consecutive_failures = 0;
        match self.state {
            BreakerState::Closed => None,
            _ => self.set(BreakerState::Closed),
        }
    }

    /// Records a step that failed at `now`. Returns the new state when it changed (opened, or
    /// re-opened by a failed probe).
    pub fn on_failure(&mut self, now: Instant) -> Option<BreakerState> {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        // A cool-down too long to add is as good as a year.
        let until = now.checked_add(self.config.cooldown).unwrap_or(now + Duration::from_secs(365 * 86_400));
        let open = BreakerState::Open { until };
        match self.state {
            BreakerState::Closed if self.consecutive_failures >= self.config.threshold => self.set(open),
            BreakerState::HalfOpen => self.set(open),
            _ => None,
        }
    }

    fn set(&mut self, state: BreakerState) -> Option<BreakerState> {
        self.state = state;
        Some(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_millis(300);

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig { threshold: 3, cooldown: COOLDOWN })
    }

    #[test]
    fn opens_after_threshold_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = breaker();
        assert_eq!(b.on_failure(t0), None);
        assert_eq!(b.on_failure(t0), None);
        // A success in between resets the count.
        assert_eq!(b.on_success(), None);
        assert_eq!(b.consecutive_failures(), 0);
        assert_eq!(b.on_failure(t0), None);
        assert_eq!(b.on_failure(t0), None);
        assert_eq!(b.held_until(), None);
        let opened = b.on_failure(t0);
        assert_eq!(opened, Some(BreakerState::Open { until: t0 + COOLDOWN }));
        assert_eq!(b.held_until(), Some(t0 + COOLDOWN));
        assert_eq!(b.state().as_str(), "open");
    }

    #[test]
    fn retry_after_is_the_remaining_cooldown() {
        let t0 = Instant::now();
        let state = BreakerState::Open { until: t0 + COOLDOWN };
        assert_eq!(state.retry_after(t0), Some(COOLDOWN));
        assert_eq!(state.retry_after(t0 + Duration::from_millis(100)), Some(Duration::from_millis(200)));
        assert_eq!(state.retry_after(t0 + COOLDOWN), None);
        assert_eq!(BreakerState::Closed.retry_after(t0), None);
        assert_eq!(BreakerState::HalfOpen.retry_after(t0), None);
    }

    #[test]
    fn half_opens_after_the_cooldown_and_a_good_probe_closes_it() {
        let t0 = Instant::now();
        let mut b = breaker();
        (0..3).for_each(|_| {
            b.on_failure(t0);
        });
        assert_eq!(b.poll(t0 + COOLDOWN - Duration::from_millis(1)), None);
        assert!(b.held_until().is_some());
        assert_eq!(b.poll(t0 + COOLDOWN), Some(BreakerState::HalfOpen));
        assert_eq!(b.held_until(), None, "the probe step may run");
        assert_eq!(b.poll(t0 + COOLDOWN * 2), None, "half-open stays until a step has run");
        assert_eq!(b.on_success(), Some(BreakerState::Closed));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_it_at_once_for_another_cooldown() {
        let t0 = Instant::now();
        let mut b = breaker();
        (0..3).for_each(|_| {
            b.on_failure(t0);
        });
        let t1 = t0 + COOLDOWN;
        b.poll(t1);
        // One failure is enough in half-open, whatever the threshold.
        assert_eq!(b.on_failure(t1), Some(BreakerState::Open { until: t1 + COOLDOWN }));
        assert_eq!(b.poll(t1 + COOLDOWN), Some(BreakerState::HalfOpen));
        assert_eq!(b.on_success(), Some(BreakerState::Closed));
        // Closed again: the count starts from zero.
        assert_eq!(b.on_failure(t1), None);
    }

    #[test]
    fn config_is_validated() {
        assert!(BreakerConfig::default().validate().is_ok());
        assert!(BreakerConfig { threshold: 0, ..Default::default() }.validate().is_err());
        assert!(BreakerConfig { cooldown: Duration::ZERO, ..Default::default() }.validate().is_err());
    }
}
