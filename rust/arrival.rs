//! Which bytes of a shard that is still being downloaded have arrived.
//!
//! A shard streamed from the hub is opened while its bytes are still coming:
//! the downloader (Python) pre-sizes the file, writes its header first, and
//! then writes ranges of it in whatever order they come, calling
//! [`Arrival::add`] after each write. A [`crate::reader::View`] of such a shard
//! waits ([`Arrival::wait`]) until its tensor's bytes have all arrived before
//! anything reads them, so nothing ever reads a byte the file does not hold
//! yet. A download that fails (a hash mismatch, a server that keeps failing,
//! the load being interrupted) calls [`Arrival::fail`]: every waiter wakes up
//! with that message, and every later wait fails with it at once.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The arrived ranges of one file of `len` bytes, and whether its download failed.
#[derive(Debug)]
pub struct Arrival {
    len: u64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Sorted, disjoint, non-adjacent `[start, end)` ranges.
    have: Vec<(u64, u64)>,
    /// The first failure reported; waits fail with it.
    failed: Option<String>,
}

impl State {
    fn covers(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        // The last range starting at or before `start` must reach `end`.
        let i = self.have.partition_point(|&(s, _)| s <= start);
        i > 0 && self.have[i - 1].1 >= end
    }

    fn add(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // Ranges overlapping or touching [start, end) are merged into it.
        let first = self.have.partition_point(|&(_, e)| e < start);
        let last = self.have.partition_point(|&(s, _)| s <= end);
        let (mut lo, mut hi) = (start, end);
        if first < last {
            lo = lo.min(self.have[first].0);
            hi = hi.max(self.have[last - 1].1);
        }
        self.have.splice(first..last, [(lo, hi)]);
    }
}

impl Arrival {
    /// Nothing of a file of `len` bytes has arrived yet.
    pub fn new(len: u64) -> Arrival {
        Arrival {
            len,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one still holds
        // consistent ranges.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes `[start, end)` were written to the file (clamped to its length).
    pub fn add(&self, start: u64, end: u64) {
        self.lock().add(start.min(self.len), end.min(self.len));
        self.changed.notify_all();
    }

    /// The download failed: wake every waiter with `message` (the first
    /// failure is kept).
    pub fn fail(&self, message: &str) {
        let mut st = self.lock();
        if st.failed.is_none() {
            st.failed = Some(message.to_owned());
        }
        drop(st);
        self.changed.notify_all();
    }

    /// The failure reported, if any.
    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Whether all of `[start, end)` has arrived.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.lock().covers(start, end)
    }

    /// Where the bytes arrived from the start of the file end (0: none yet).
    pub fn contiguous(&self) -> u64 {
        match self.lock().have.first() {
            Some(&(0, end)) => end,
            _ => 0,
        }
    }

    /// The arrived ranges, sorted and merged.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.lock().have.clone()
    }

    /// The parts of `[start, end)` (clamped) that have not arrived, in order.
    pub fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let (mut at, end) = (start.min(self.len), end.min(self.len));
        let mut gaps = Vec::new();
        for &(s, e) in &self.lock().have {
            if at >= end || s >= end {
                break;
            }
            if e <= at {
                continue;
            }
            if s > at {
                gaps.push((at, s));
            }
            at = e;
        }
        if at < end {
            gaps.push((at, end));
        }
        gaps
    }

    /// Total bytes arrived.
    pub fn arrived(&self) -> u64 {
        self.lock().have.iter().map(|&(s, e)| e - s).sum()
    }

    /// Wait until `[start, end)` has arrived: `Ok(true)`; `Ok(false)` when
    /// `timeout` passed first; `Err(message)` once the download failed (even
    /// if these bytes arrived: what they belong to will not be complete).
    pub fn wait(
        &self,
        start: u64,
        end: u64,
        timeout: Option<Duration>,
    ) -> std::result::Result<bool, String> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            if let Some(message) = &st.failed {
                return Err(message.clone());
            }
            if st.covers(start, end) {
                return Ok(true);
            }
            st = match deadline {
                None => self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(false);
                    }
                    self.changed
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ranges(a: &Arrival) -> Vec<(u64, u64)> {
        a.lock().have.clone()
    }

    #[test]
    fn ranges_merge_when_they_touch_or_overlap() {
        let a = Arrival::new(100);
        a.add(10, 20);
        a.add(30, 40);
        assert_eq!(ranges(&a), [(10, 20), (30, 40)]);
        a.add(20, 30);
        assert_eq!(ranges(&a), [(10, 40)]);
        a.add(0, 5);
        a.add(50, 60);
        a.add(3, 55);
        assert_eq!(ranges(&a), [(0, 60)]);
        a.add(90, 200);
        assert_eq!(ranges(&a), [(0, 60), (90, 100)]);
        assert_eq!(a.arrived(), 70);
    }

    #[test]
    fn missing_and_contiguous_are_the_gaps() {
        let a = Arrival::new(100);
        assert_eq!(a.missing(0, 100), [(0, 100)]);
        assert_eq!(a.contiguous(), 0);
        a.add(10, 20);
        a.add(30, 40);
        assert_eq!(a.contiguous(), 0);
        assert_eq!(a.missing(0, 100), [(0, 10), (20, 30), (40, 100)]);
        assert_eq!(a.missing(15, 35), [(20, 30)]);
        assert_eq!(a.missing(12, 18), []);
        assert_eq!(a.missing(90, 200), [(90, 100)]);
        a.add(0, 10);
        assert_eq!(a.contiguous(), 20);
        assert_eq!(a.ranges(), [(0, 20), (30, 40)]);
    }

    #[test]
    fn covers_needs_every_byte() {
        let a = Arrival::new(100);
        a.add(10, 20);
        a.add(21, 30);
        assert!(a.covers(10, 20));
        assert!(a.covers(12, 15));
        assert!(!a.covers(10, 21));
        assert!(!a.covers(9, 12));
        assert!(!a.covers(15, 25));
        assert!(a.covers(50, 50), "an empty range is always there");
    }

    #[test]
    fn wait_returns_when_the_bytes_arrive() {
        let a = Arc::new(Arrival::new(100));
        let waiter = {
            let a = Arc::clone(&a);
            std::thread::spawn(move || a.wait(0, 100, None))
        };
        a.add(0, 50);
        a.add(50, 100);
        assert_eq!(waiter.join().unwrap(), Ok(true));
    }

    #[test]
    fn wait_times_out_and_failure_wakes_every_waiter() {
        let a = Arc::new(Arrival::new(100));
        assert_eq!(a.wait(0, 10, Some(Duration::from_millis(5))), Ok(false));
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let a = Arc::clone(&a);
                std::thread::spawn(move || a.wait(0, 100, None))
            })
            .collect();
        a.fail("sha256 mismatch");
        a.fail("a later failure is not kept");
        for w in waiters {
            assert_eq!(w.join().unwrap(), Err("sha256 mismatch".to_owned()));
        }
        a.add(0, 100);
        assert_eq!(a.wait(0, 10, None), Err("sha256 mismatch".to_owned()));
    }
}
