//! [`TokenBucket`]: a bucket of tokens that refills continuously and takes refunds. It is handed
//! the time, so it is tested without sleeping.

use std::time::{Duration, Instant};

use super::Window;

/// Holds up to `capacity` tokens and refills at `capacity` per `period`. A charge is taken whole
/// or not at all; tokens spent past a charge are taken regardless (the level may go below zero);
/// a refund never fills it past its capacity.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: u64,
    period: Duration,
    /// Tokens in the bucket as of `updated` (fractional: refills are continuous).
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u64, period: Duration, now: Instant) -> Self {
        debug_assert!(capacity > 0 && !period.is_zero());
        Self { capacity, period, level: capacity as f64, updated: now }
    }

    /// Most tokens it holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    fn per_second(&self) -> f64 {
        self.capacity as f64 / self.period.as_secs_f64()
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second()).min(self.capacity as f64);
        self.updated = self.updated.max(now);
    }

    /// Takes `n` tokens; else `Err(Some(wait))`, the time until they are there, or `Err(None)`
    /// when `n` is more than the bucket ever holds.
    pub fn take(&mut self, n: u64, now: Instant) -> Result<(), Option<Duration>> {
        if n > self.capacity {
            return Err(None);
        }
        self.refill(now);
        let missing = n as f64 - self.level;
        if missing > 0.0 {
            return Err(Some(Duration::from_secs_f64(missing / self.per_second())));
        }
        self.level -= n as f64;
        Ok(())
    }

    /// Takes `n` tokens already spent (a generation running past what it reserved), even below
    /// empty: the caller then waits until the debt has refilled.
    pub fn take_spent(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level -= n as f64;
    }

    /// Gives back `n` tokens taken earlier and not used.
    pub fn give(&mut self, n: u64, now: Instant) {
        self.refill(now);
        self.level = (self.level + n as f64).min(self.capacity as f64);
    }

    /// Tokens in the bucket as of `now`, below zero while spent tokens are owed.
    #[cfg(test)]
    pub(crate) fn level_now(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    /// Limit, whole tokens left, and time until full, as of `now`.
    pub fn window(&mut self, now: Instant) -> Window {
        self.refill(now);
        let missing = self.capacity as f64 - self.level;
        Window {
            limit: self.capacity,
            remaining: self.level.floor() as u64,
            reset: Duration::from_secs_f64(missing / self.per_second()),
        }
    }
}
