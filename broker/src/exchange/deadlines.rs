//! The deadlines of the exchanges in the dispatcher's hands, soonest first.
//!
//! A min-heap of (deadline, id) rather than an ordered set: 24 bytes an entry in one array,
//! built in place from the recovered queue at start, where the set took its B-tree nodes
//! (half full when filled in deadline order, about 50 MB at a million queued) and, at start,
//! a sorted copy of every entry besides. A heap cannot remove from the middle, so an exchange
//! that ends leaves its entry behind: the entry is dropped when it comes up, or when ended
//! entries outnumber live ones ([`Deadlines::compact`]).

use super::dispatcher::Id;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Ended entries tolerated beyond the live ones before [`Deadlines::compact`] sweeps them.
const SLACK: usize = 1024;
/// Unused room (entries) kept after a sweep: below it, shrinking and growing again at every
/// sweep of a busy broker's few live entries would only churn the allocator.
const KEEP: usize = 1 << 16;

/// Deadlines, Unix ms, of the exchanges in the dispatcher's hands (and of some that ended).
#[derive(Debug, Default)]
pub(super) struct Deadlines {
    heap: BinaryHeap<Reverse<(i64, Id)>>,
}

impl Deadlines {
    /// Every entry at once, in any order: the list becomes the heap, in place.
    pub(super) fn from_vec(entries: Vec<(i64, Id)>) -> Self {
        // `Reverse` has its content's layout, so this collect reuses the list's memory.
        let entries: Vec<Reverse<(i64, Id)>> = entries.into_iter().map(Reverse).collect();
        Self {
            heap: BinaryHeap::from(entries),
        }
    }

    /// Adds an exchange's deadline.
    pub(super) fn push(&mut self, deadline_ms: i64, id: Id) {
        self.heap.push(Reverse((deadline_ms, id)));
    }

    /// Takes the entries due before `now` that `live` says are still in the dispatcher's
    /// hands under that deadline, soonest first; drops the others on the way.
    pub(super) fn due(&mut self, now: i64, live: impl Fn(i64, &str) -> bool) -> Vec<(i64, Id)> {
        let mut out = Vec::new();
        while self.heap.peek().is_some_and(|Reverse((dl, _))| *dl < now) {
            if let Some(Reverse((dl, id))) = self.heap.pop() {
                if live(dl, &id) {
                    out.push((dl, id));
                }
            }
        }
        out
    }

    /// Drops the ended entries once they outnumber the `live_count` live ones (by more than
    /// [`SLACK`]), and gives back the memory of a drained backlog: an exchange that ends
    /// long before its deadline would otherwise keep its entry until then.
    pub(super) fn compact(&mut self, live_count: usize, live: impl Fn(i64, &str) -> bool) {
        if self.heap.len() <= live_count.saturating_mul(2).saturating_add(SLACK) {
            return;
        }
        self.heap.retain(|Reverse((dl, id))| live(*dl, id));
        if self.heap.capacity() > self.heap.len().saturating_mul(4).saturating_add(KEEP) {
            self.heap.shrink_to(self.heap.len().saturating_mul(2));
        }
    }

    /// Entries held, live and ended.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn id(s: &str) -> Id {
        s.into()
    }

    #[test]
    fn due_entries_come_soonest_first_and_ended_ones_are_dropped() {
        let mut d = Deadlines::from_vec(vec![(30, id("c")), (10, id("a")), (20, id("b"))]);
        d.push(5, id("gone"));
        d.push(40, id("later"));
        let live: HashMap<&str, i64> = [("a", 10), ("b", 20), ("c", 30), ("later", 40)].into();
        let is_live = |dl: i64, id: &str| live.get(id) == Some(&dl);
        let due = d.due(25, is_live);
        assert_eq!(due, vec![(10, id("a")), (20, id("b"))]);
        // "gone" was dropped on the way; "c" and "later" are not due yet.
        assert_eq!(d.len(), 2);
        assert_eq!(d.due(25, is_live), vec![]);
        assert_eq!(d.due(41, is_live), vec![(30, id("c")), (40, id("later"))]);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn an_entry_under_an_older_deadline_is_not_due_for_its_requeued_exchange() {
        let mut d = Deadlines::default();
        d.push(10, id("x"));
        // Ended, then queued again (a replay) under a new deadline.
        d.push(50, id("x"));
        let is_live = |dl: i64, id: &str| id == "x" && dl == 50;
        assert_eq!(d.due(20, is_live), vec![]);
        assert_eq!(d.due(60, is_live), vec![(50, id("x"))]);
    }

    #[test]
    fn compaction_waits_for_ended_entries_to_outnumber_live_ones_then_drops_them() {
        let n = 2 * KEEP;
        let mut d = Deadlines::from_vec((0..n).map(|i| (i as i64, id(&i.to_string()))).collect());
        // All but the first ten ended.
        let is_live = |dl: i64, _: &str| dl < 10;
        d.compact(n, is_live);
        assert_eq!(d.len(), n, "as many live as held: nothing to do");
        d.compact(10, is_live);
        assert_eq!(d.len(), 10);
        assert!(d.heap.capacity() < 4 * 10 + KEEP, "memory given back");
        let due = d.due(i64::MAX, is_live);
        assert_eq!(due.len(), 10);
        assert!(due.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
