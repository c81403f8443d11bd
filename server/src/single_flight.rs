//! Single flight: while one request computes the value of a key, identical requests wait for it
//! instead of computing it again.
//!
//! The response cache and idempotency keys both build on [`SingleFlight`]:
//! - [`SingleFlight::join`] first asks the caller's store for a finished value, then either makes
//!   the caller the [`Leader`] of a new flight or waits for the running one.
//! - A leader that [completes](Leader::complete) hands its value to every waiter. A leader dropped
//!   unfinished (its request failed, or its client went away) lets them go: they look again, and
//!   one of them leads the next flight.
//! - A flight carries a tag (the idempotency store's request fingerprint; `()` for the cache); a
//!   request whose tag differs from the running flight's is told so instead of waiting.
//! - Waiting is bounded: past its patience a request stops waiting (a leader whose client stopped
//!   reading would otherwise hold it forever).

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

/// A running flight: its id (so that a leader removes only its own entry), its tag, and the
/// channel its value comes on.
struct Running<V, T> {
    id: u64,
    tag: T,
    rx: watch::Receiver<Option<V>>,
}

struct Inner<K, V, T> {
    running: DashMap<K, Running<V, T>>,
    next_id: AtomicU64,
}

/// The flights running now, by key, each tagged with a `T`. Cheap to clone (clones share them).
pub struct SingleFlight<K, V, T = ()>(Arc<Inner<K, V, T>>);

impl<K, V, T> Clone for SingleFlight<K, V, T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<K: Eq + Hash, V, T> Default for SingleFlight<K, V, T> {
    fn default() -> Self {
        Self(Arc::new(Inner { running: DashMap::new(), next_id: AtomicU64::new(0) }))
    }
}

impl<K: Eq + Hash, V, T> fmt::Debug for SingleFlight<K, V, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlight").field("running", &self.0.running.len()).finish()
    }
}

/// What [`SingleFlight::join`] found.
pub enum Join<K: Eq + Hash, V, T> {
    /// A finished value: from the caller's store, or from the flight waited for.
    Done(V),
    /// No flight was running: the caller computes the value and hands it to
    /// [`Leader::complete`].
    Lead(Leader<K, V, T>),
    /// A flight with another tag is running.
    Conflict,
    /// The patience ran out while a flight was still running.
    TimedOut,
}

impl<K: Eq + Hash, V, T> fmt::Debug for Join<K, V, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Done(_) => f.write_str("Done(..)"),
            Self::Lead(leader) => f.debug_tuple("Lead").field(leader).finish(),
            Self::Conflict => f.write_str("Conflict"),
            Self::TimedOut => f.write_str("TimedOut"),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone, T: PartialEq> SingleFlight<K, V, T> {
    /// No flights.
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins the flight of `key`. `stored` looks up a finished value (the caller's store); it is
    /// asked first, and asked again under the key's lock before a new flight starts, so that a
    /// leader finishing meanwhile is not missed (a leader stores its value before
    /// [completing](Leader::complete)). When a flight tagged `tag` is running, waits for it, at
    /// most `patience` in all; when its leader goes away unfinished, looks again (and may lead).
    pub async fn join(&self, key: K, tag: T, patience: Duration, stored: impl Fn() -> Option<V>) -> Join<K, V, T> {
        let now = tokio::time::Instant::now();
        // A patience too long to represent is as good as none (30 years, as `tokio::time::timeout`).
        let give_up = now.checked_add(patience).unwrap_or_else(|| now + Duration::from_secs(86400 * 365 * 30));
        loop {
            if let Some(value) = stored() {
                return Join::Done(value);
            }
            let mut running = match self.0.running.entry(key.clone()) {
                Entry::Occupied(flight) if flight.get().tag != tag => return Join::Conflict,
                Entry::Occupied(flight) => flight.get().rx.clone(),
                Entry::Vacant(slot) => {
                    if let Some(value) = stored() {
                        return Join::Done(value);
                    }
                    let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    slot.insert(Running { id, tag, rx });
                    return Join::Lead(Leader { flights: self.0.clone(), key, id, tx });
                }
            };
            let waited = tokio::time::timeout_at(give_up, running.wait_for(Option::is_some));
            let Ok(done) = waited.await else { return Join::TimedOut };
            if let Some(value) = done.ok().and_then(|v| v.clone()) {
                return Join::Done(value);
            }
            // The leader went away unfinished: look again.
        }
    }
}

/// The request computing one key's value. Completing hands the value to the waiters; dropping
/// it unfinished lets them go (one of them then leads). Either way the flight ends.
pub struct Leader<K: Eq + Hash, V, T> {
    flights: Arc<Inner<K, V, T>>,
    key: K,
    id: u64,
    tx: watch::Sender<Option<V>>,
}

impl<K: Eq + Hash, V, T> fmt::Debug for Leader<K, V, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leader").field("id", &self.id).finish_non_exhaustive()
    }
}

impl<K: Eq + Hash, V, T> Leader<K, V, T> {
    /// The flight's id, unique within its [`SingleFlight`].
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Hands `value` to the waiters and ends the flight. Store it where the `stored` of
    /// [`SingleFlight::join`] finds it first: requests arriving after the flight ends look there.
    pub fn complete(self, value: V) {
        self.tx.send_replace(Some(value));
        // `Drop` ends the flight.
    }
}

impl<K: Eq + Hash, V, T> Drop for Leader<K, V, T> {
    fn drop(&mut self) {
        self.flights.running.remove_if(&self.key, |_, flight| flight.id == self.id);
        // Dropping `tx` wakes the waiters; unless `complete` ran, they look again.
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    type Flights = SingleFlight<u32, &'static str, u8>;

    fn nothing() -> Option<&'static str> {
        None
    }

    fn lead(join: Join<u32, &'static str, u8>) -> Leader<u32, &'static str, u8> {
        match join {
            Join::Lead(leader) => leader,
            other => panic!("expected to lead, got {other:?}"),
        }
    }

    /// A follower of `key` on its own task.
    fn follow(flights: &Flights, key: u32, patience: Duration) -> tokio::task::JoinHandle<Join<u32, &'static str, u8>> {
        let flights = flights.clone();
        tokio::spawn(async move { flights.join(key, 0, patience, nothing).await })
    }

    /// Lets spawned tasks run until they wait.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn the_first_request_leads_and_a_stored_value_is_returned_without_a_flight() {
        let flights = Flights::new();
        let leader = lead(flights.join(1, 0, LONG, nothing).await);
        // Another key is a flight of its own.
        let other = lead(flights.join(2, 0, LONG, nothing).await);
        assert_ne!(leader.id(), other.id());
        assert!(matches!(flights.join(3, 0, LONG, || Some("stored")).await, Join::Done("stored")));
        assert_eq!(flights.0.running.len(), 2);
    }

    #[tokio::test]
    async fn a_follower_wakes_with_the_leaders_value() {
        let flights = Flights::new();
        let leader = lead(flights.join(1, 0, LONG, nothing).await);
        let follower = follow(&flights, 1, LONG);
        settle().await;
        assert!(!follower.is_finished(), "the follower waits for the leader");
        leader.complete("value");
        assert!(matches!(follower.await.unwrap(), Join::Done("value")));
        assert_eq!(flights.0.running.len(), 0, "a completed flight ends");
    }

    #[tokio::test]
    async fn the_store_is_asked_again_before_a_new_flight_starts() {
        let flights = Flights::new();
        let asked = Mutex::new(0);
        // Empty at the first look, filled by the time the key is locked.
        let stored = || {
            let mut asked = asked.lock().unwrap();
            *asked += 1;
            (*asked > 1).then_some("stored")
        };
        assert!(matches!(flights.join(1, 0, LONG, stored).await, Join::Done("stored")));
        assert_eq!(flights.0.running.len(), 0);
    }

    #[tokio::test]
    async fn a_follower_takes_over_when_the_leader_goes_away_unfinished() {
        let flights = Flights::new();
        let leader = lead(flights.join(1, 0, LONG, nothing).await);
        let first_id = leader.id();
        let follower = follow(&flights, 1, LONG);
        settle().await;
        drop(leader);
        let next = lead(follower.await.unwrap());
        assert_ne!(next.id(), first_id);
        // The old leader's removal left the new flight in place.
        assert_eq!(flights.0.running.len(), 1);
        let late = follow(&flights, 1, LONG);
        settle().await;
        next.complete("value");
        assert!(matches!(late.await.unwrap(), Join::Done("value")));
    }

    #[tokio::test]
    async fn a_flight_with_another_tag_is_a_conflict() {
        let flights = Flights::new();
        let _leader = lead(flights.join(1, 7, LONG, nothing).await);
        assert!(matches!(flights.join(1, 8, LONG, nothing).await, Join::Conflict));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_by_the_patience() {
        let flights = Flights::new();
        let leader = lead(flights.join(1, 0, LONG, nothing).await);
        let started = tokio::time::Instant::now();
        assert!(matches!(flights.join(1, 0, Duration::from_secs(5), nothing).await, Join::TimedOut));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // The flight is still the leader's.
        assert_eq!(flights.0.running.len(), 1);
        leader.complete("value");
    }

    #[tokio::test(start_paused = true)]
    async fn the_patience_covers_every_wait_in_all() {
        let flights = Flights::new();
        let first = lead(flights.join(1, 0, LONG, nothing).await);
        let follower = follow(&flights, 1, Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(3)).await;
        // The first leader goes away and another request leads before the follower looks again:
        // the follower waits on the new flight with what is left of its patience.
        drop(first);
        let second = lead(flights.join(1, 0, LONG, nothing).await);
        let started = tokio::time::Instant::now();
        let joined = follower.await.unwrap();
        assert!(matches!(joined, Join::TimedOut), "got {joined:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        second.complete("value");
    }
}
