//! `WaitingQueue`: requests waiting for admission, ordered by (priority, arrival), removable by id.

use std::cmp::Reverse;
use std::time::Instant;

use priority_queue::PriorityQueue;

use crate::sequence::RequestId;

/// The waiting requests. A `priority-queue` rather than a `BinaryHeap` because a waiting request
/// can be aborted by id at any time.
#[derive(Debug, Default)]
pub struct WaitingQueue {
    // `PriorityQueue` pops the greatest priority, so the key is reversed: the smallest
    // (priority, arrival order) comes out first.
    queue: PriorityQueue<RequestId, Reverse<(i32, u64)>>,
}

impl WaitingQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or re-adds, after preemption) a request with its scheduling key.
    pub fn push(&mut self, id: RequestId, key: (i32, u64)) {
        self.queue.push(id, Reverse(key));
    }

    /// The request that would be admitted next.
    pub fn peek(&self) -> Option<RequestId> {
        self.queue.peek().map(|(id, _)| *id)
    }

    /// Takes the request that would be admitted next.
    pub fn pop(&mut self) -> Option<RequestId> {
        self.queue.pop().map(|(id, _)| id)
    }

    /// Removes a request by id; true if it was waiting.
    pub fn remove(&mut self, id: RequestId) -> bool {
        self.queue.remove(&id).is_some()
    }

    /// True if `id` is waiting.
    pub fn contains(&self, id: RequestId) -> bool {
        self.queue.get(&id).is_some()
    }

    /// Number of waiting requests.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The ids, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.queue.iter().map(|(id, _)| *id)
    }

    /// The earliest arrival among `arrivals` of the waiting ids (used by the admission window).
    pub fn oldest(&self, arrival_of: impl Fn(RequestId) -> Option<Instant>) -> Option<Instant> {
        self.ids().filter_map(arrival_of).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_by_priority_then_arrival_and_removes_by_id() {
        let mut q = WaitingQueue::new();
        q.push(10, (0, 3));
        q.push(11, (-1, 4));
        q.push(12, (0, 1));
        q.push(13, (5, 0));
        assert!(q.remove(12));
        assert!(!q.remove(12));
        assert_eq!(q.pop(), Some(11));
        assert_eq!(q.pop(), Some(10));
        assert_eq!(q.pop(), Some(13));
        assert_eq!(q.pop(), None);
    }
}
