//! An ordered stream of tensor views with a background read-ahead thread.
//!
//! The consumer takes views in order with [`Stream::next`]. Asking for item
//! `i + 1` releases item `i` (its pages leave the resident set, its bytes go
//! back to the budget). A `std::thread` (which never touches Python objects)
//! walks ahead of the consumer, faulting in upcoming tensors chunk by chunk,
//! while `prefetched - released <= window` (it may always take one chunk when
//! nothing is held, so a tensor larger than the window still progresses). It
//! skips items the consumer has already passed or released, and stops when
//! it reaches the end, or promptly when the stream is closed or dropped (it
//! waits on a `Condvar`, never polls).
//!
//! Every view is checked twice: before it is handed out (the file still holds
//! its bytes) and after it was used ([`Stream::check`], or implicitly when the
//! consumer asks for the next item or reaches the end): the file did not
//! shrink under it while it was read (see [`crate::fault`]).

use crate::error::{Error, Result};
use crate::reader::{page_size, View, ARRIVAL_POLL};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Default read-ahead window, in bytes.
pub const DEFAULT_WINDOW: u64 = 256 << 20;
/// Largest unit of read-ahead work between two checks of `stop`.
const MAX_CHUNK: u64 = 4 << 20;

/// Budget and progress shared by the consumer, the read-ahead thread and the
/// views handed out (which release through it).
#[derive(Debug)]
pub struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Debug)]
struct State {
    /// Items `[0, passed)` are behind the consumer: never prefetch them.
    passed: usize,
    /// Bytes prefetched and not yet released.
    in_use: u64,
    /// Per item: bytes charged to the budget, not yet released.
    charged: Vec<u64>,
    /// Per item: released (by the consumer moving on, or `View` release).
    released: Vec<bool>,
    stop: bool,
    /// Statistics, for tests: total bytes prefetched, and the peak of `in_use`.
    prefetched: u64,
    peak_in_use: u64,
    /// The read-ahead thread waits for budget (everything it took so far was
    /// faulted in).
    waiting: bool,
}

/// What the read-ahead has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub prefetched: u64,
    pub in_use: u64,
    pub peak_in_use: u64,
    /// The read-ahead thread waits for budget: nothing moves until the
    /// consumer does (or the stream is closed).
    pub waiting: bool,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::internal("stream state lock poisoned"))
    }

    /// Release item `index` (once): return its bytes to the budget, wake the
    /// read-ahead thread, and drop the pages of `view` from the resident set.
    fn release(&self, index: usize, view: &View) -> Result<()> {
        {
            let mut st = self.lock()?;
            let Some(done) = st.released.get_mut(index) else {
                return Err(Error::internal(
                    "release of an item the stream does not have",
                ));
            };
            if *done {
                return Ok(());
            }
            *done = true;
            let charged = std::mem::take(&mut st.charged[index]);
            st.in_use -= charged;
        }
        self.wake.notify_all();
        view.release();
        Ok(())
    }
}

/// Lets a handed-out view give its bytes back to its stream's budget.
#[derive(Debug, Clone)]
pub struct Slot {
    shared: Arc<Shared>,
    index: usize,
}

impl Slot {
    /// Release `view` (the view this slot was handed out with).
    pub fn release(&self, view: &View) -> Result<()> {
        self.shared.release(self.index, view)
    }
}

/// The ordered stream. Dropping it stops and joins the read-ahead thread.
#[derive(Debug)]
pub struct Stream {
    items: Arc<[View]>,
    shared: Arc<Shared>,
    next: usize,
    /// Items `[0, checked)` were checked after use.
    checked: usize,
    window: u64,
    total_bytes: u64,
    thread: Option<JoinHandle<()>>,
}

impl Stream {
    /// Start streaming `items` in this order with read-ahead bounded by
    /// `window` bytes (clamped to at least 1).
    pub fn new(items: Vec<View>, window: u64) -> Result<Stream> {
        let window = window.max(1);
        let n = items.len();
        let total_bytes = items.iter().map(|v| v.info().nbytes()).sum();
        let items: Arc<[View]> = items.into();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                passed: 0,
                in_use: 0,
                charged: vec![0; n],
                released: vec![false; n],
                stop: false,
                prefetched: 0,
                peak_in_use: 0,
                waiting: false,
            }),
            wake: Condvar::new(),
        });
        let chunk = MAX_CHUNK.min(window.max(page_size() as u64));
        let thread = if total_bytes > 0 {
            let (items, shared) = (Arc::clone(&items), Arc::clone(&shared));
            let handle = std::thread::Builder::new()
                .name("leanstream-readahead".into())
                .spawn(move || read_ahead(&items, &shared, window, chunk))
                .map_err(|e| {
                    Error::new(
                        crate::error::ErrorKind::Io,
                        format!("cannot start the read-ahead thread: {e}"),
                    )
                })?;
            Some(handle)
        } else {
            None
        };
        Ok(Stream {
            items,
            shared,
            next: 0,
            checked: 0,
            window,
            total_bytes,
            thread,
        })
    }

    pub fn window(&self) -> u64 {
        self.window
    }

    /// Sum of the byte sizes of all items (duplicates counted each time).
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Number of items not yet yielded.
    pub fn remaining(&self) -> usize {
        self.items.len() - self.next
    }

    /// The next view, after checking ([`Stream::check`]) and releasing the
    /// previous one. `None` at the end (or after [`Stream::close`]); at the end,
    /// a failed check of the last view is returned first. The file's size is
    /// checked (fstat) before the view is handed out.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<(View, Slot)>> {
        if let Err(e) = self.move_on() {
            return Some(Err(e));
        }
        if self.next >= self.items.len() {
            return None;
        }
        let (view, slot) = self.hand_out(self.next);
        if let Err(e) = self.pass(slot.index).and_then(|()| view.check_available()) {
            return Some(Err(e));
        }
        Some(Ok((view, slot)))
    }

    /// The next `n` views at once, after checking and releasing the previous
    /// one as [`Stream::next`] does. The caller uses them in any order and
    /// releases each through its slot once used (the read-ahead skips those
    /// released, and keeps faulting in the others): moving on releases only
    /// the last of them, and closing the stream none, so a view not released
    /// keeps its bytes charged to the window. Fails if fewer than `n` remain;
    /// if a file no longer holds one of them, releases those taken and fails.
    pub fn next_many(&mut self, n: usize) -> Result<Vec<(View, Slot)>> {
        self.move_on()?;
        let first = self.next;
        if n > self.items.len() - first {
            return Err(Error::internal(
                "more tensors asked for than the stream has left",
            ));
        }
        self.pass(first)?;
        let mut taken = Vec::with_capacity(n);
        for index in first..first + n {
            let (view, slot) = self.hand_out(index);
            if let Err(e) = view.check_available() {
                // none of them will be used: give their bytes back
                for (view, slot) in taken.iter().chain([(view, slot)].iter()) {
                    slot.release(view)?;
                }
                return Err(e);
            }
            taken.push((view, slot));
        }
        Ok(taken)
    }

    /// The consumer moves on: check the views used so far and release the
    /// last one handed out.
    fn move_on(&mut self) -> Result<()> {
        self.check()?;
        if self.next > 0 {
            let prev = self.next - 1;
            self.shared.release(prev, &self.items[prev])?;
        }
        Ok(())
    }

    /// Item `index` (the next one) handed out: checked after use from now on.
    fn hand_out(&mut self, index: usize) -> (View, Slot) {
        self.next = index + 1;
        let slot = Slot {
            shared: Arc::clone(&self.shared),
            index,
        };
        (self.items[index].clone(), slot)
    }

    /// Tell the read-ahead that the consumer is at item `index`: nothing
    /// before it is faulted in any more.
    fn pass(&self, index: usize) -> Result<()> {
        self.shared.lock()?.passed = index;
        self.shared.wake.notify_all();
        Ok(())
    }

    /// Check the views handed out since the last check, after their bytes were
    /// used: [`View::check`] (the file did not shrink under them). Cheap: an
    /// atomic load and an fstat per view.
    pub fn check(&mut self) -> Result<()> {
        while self.checked < self.next {
            self.items[self.checked].check()?;
            self.checked += 1;
        }
        Ok(())
    }

    /// Stop and join the read-ahead thread, release what it prefetched for
    /// items never yielded, and let go of the items: a closed stream keeps no
    /// shard mapped (views already handed out keep theirs, and stay valid).
    /// Idempotent.
    pub fn close(&mut self) -> Result<()> {
        let stopped = self.shared.lock().map(|mut st| st.stop = true);
        self.shared.wake.notify_all();
        let joined = match self.thread.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| Error::internal("the read-ahead thread panicked")),
            None => Ok(()),
        };
        // Items not yet yielded: nobody can read them through this stream.
        let unread: Vec<usize> = match self.shared.lock() {
            Ok(st) => (self.next..self.items.len())
                .filter(|&i| st.charged[i] > 0)
                .collect(),
            Err(e) => return Err(e),
        };
        for i in unread {
            self.shared.release(i, &self.items[i])?;
        }
        self.items = Arc::from(Vec::new());
        (self.next, self.checked) = (0, 0);
        stopped.and(joined)
    }

    /// Whether the read-ahead thread is still running (not yet joined).
    pub fn thread_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|h| !h.is_finished())
    }

    pub fn stats(&self) -> Result<Stats> {
        let st = self.shared.lock()?;
        Ok(Stats {
            prefetched: st.prefetched,
            in_use: st.in_use,
            peak_in_use: st.peak_in_use,
            waiting: st.waiting,
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The read-ahead thread's body: no Python, no panics, exits on `stop`, at the
/// end of the items, or if the state lock is poisoned.
fn read_ahead(items: &[View], shared: &Shared, window: u64, chunk: u64) {
    let page = page_size() as u64;
    let (mut item, mut offset) = (0usize, 0u64);
    loop {
        // Under the lock: find the next chunk and wait for budget for it.
        let (index, start, len) = {
            let Ok(mut st) = shared.state.lock() else {
                return;
            };
            let len = loop {
                if st.stop {
                    return;
                }
                if item < st.passed {
                    (item, offset) = (st.passed, 0);
                }
                while item < items.len()
                    && (st.released[item] || offset >= items[item].info().nbytes())
                {
                    (item, offset) = (item + 1, 0);
                }
                if item >= items.len() {
                    return;
                }
                // Take a whole chunk if it fits, else what fits of it (at
                // least a page), else, when nothing is held, a whole chunk
                // anyway: a tensor larger than the window still progresses.
                let want = chunk.min(items[item].info().nbytes() - offset);
                let len = if st.in_use == 0 {
                    want
                } else {
                    want.min(window.saturating_sub(st.in_use))
                };
                if len > 0 && (len == want || len >= page) {
                    break len;
                }
                st.waiting = true;
                st = match shared.wake.wait(st) {
                    Ok(mut st) => {
                        st.waiting = false;
                        st
                    }
                    Err(_) => return,
                };
            };
            st.in_use += len;
            st.charged[item] += len;
            st.prefetched += len;
            st.peak_in_use = st.peak_in_use.max(st.in_use);
            (item, offset, len)
        };
        // Bytes still being downloaded: wait for them (a failed download is
        // the consumer's to report: just skip), waking to see `stop`.
        loop {
            match items[index].wait_arrived(start, len, Some(ARRIVAL_POLL)) {
                Ok(true) => {
                    items[index].prefetch(start, len);
                    break;
                }
                Ok(false) => match shared.state.lock() {
                    Ok(st) if !st.stop && !st.released[index] => {}
                    _ => break,
                },
                Err(_) => break,
            }
        }
        offset = start + len;
        // Released while we were faulting it in: drop what we just added.
        let Ok(st) = shared.state.lock() else {
            return;
        };
        if st.released[index] {
            drop(st);
            items[index].release_range(start, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::tests::{checkpoint_of, finishes, wait_until};
    use crate::reader::Checkpoint;

    fn checkpoint(sizes: &[usize]) -> (tempfile::TempDir, Checkpoint) {
        checkpoint_of(sizes, |i, _| i as u8)
    }

    /// Wait until the read-ahead thread waits for budget (or has ended: a
    /// thread that never waits shows in what the caller asserts next).
    fn until_it_waits(stream: &Stream) -> Stats {
        wait_until("the read-ahead waits for budget", || {
            stream.stats().unwrap().waiting || !stream.thread_alive()
        });
        stream.stats().unwrap()
    }

    #[test]
    fn yields_in_the_given_order_with_duplicates() {
        let (_dir, ckpt) = checkpoint(&[10, 20, 30, 0]);
        let names = ["t2", "t0", "t3", "t2", "t1"];
        let mut stream = Stream::new(ckpt.views(&names).unwrap(), 16).unwrap();
        assert_eq!(stream.total_bytes(), 30 + 10 + 30 + 20);
        let mut seen = Vec::new();
        while let Some(item) = stream.next() {
            let (view, _slot) = item.unwrap();
            let i: u8 = view.info().name[1..].parse().unwrap();
            assert!(view.bytes().iter().all(|&b| b == i));
            seen.push(view.info().name.clone());
        }
        assert_eq!(seen, names);
        assert_eq!(stream.remaining(), 0);
        assert!(stream.next().is_none());
        // Everything was released: the whole budget came back.
        assert_eq!(stream.stats().unwrap().in_use, 0);
    }

    #[test]
    fn read_ahead_respects_the_window() {
        let page = page_size();
        let sizes = vec![3 * page; 8];
        let (_dir, ckpt) = checkpoint(&sizes);
        let names: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
        let window = 4 * page as u64;
        let mut stream = Stream::new(ckpt.views(&names).unwrap(), window).unwrap();
        // Before the consumer moves, read-ahead fills the window exactly (t0
        // and a page of t1) and waits.
        let stats = until_it_waits(&stream);
        assert!(stats.waiting, "{stats:?}");
        assert_eq!(stats.prefetched, window, "{stats:?}");
        let mut count = 0;
        while let Some(item) = stream.next() {
            item.unwrap();
            count += 1;
        }
        assert_eq!(count, 8);
        stream.close().unwrap();
        let stats = stream.stats().unwrap();
        assert!(stats.peak_in_use <= window, "{stats:?}");
        assert_eq!(stats.in_use, 0);
    }

    #[test]
    fn a_tensor_larger_than_the_window_takes_one_chunk_at_a_time() {
        let page = page_size();
        let (_dir, ckpt) = checkpoint(&[10 * page, page]);
        let mut stream = Stream::new(ckpt.views(&["t0", "t1"]).unwrap(), 1).unwrap();
        // One chunk (a page here) at a time, never more: the thread holds one
        // chunk of t0 and waits.
        let stats = until_it_waits(&stream);
        assert!(stats.waiting, "{stats:?}");
        assert_eq!(
            (stats.prefetched, stats.peak_in_use),
            (page as u64, page as u64)
        );
        // The consumer reads t0 itself, and moving on releases it, so
        // read-ahead moves to t1.
        let (v, _) = stream.next().unwrap().unwrap();
        assert_eq!(v.len(), 10 * page);
        assert!(stream.next().unwrap().is_ok());
        wait_until("read-ahead reaches t1", || {
            stream.stats().unwrap().prefetched >= 2 * page as u64
        });
        assert!(stream.next().is_none());
        stream.close().unwrap();
        let stats = stream.stats().unwrap();
        assert_eq!(stats.in_use, 0);
        assert!(stats.peak_in_use <= page as u64, "{stats:?}");
    }

    #[test]
    fn close_joins_promptly_while_waiting_for_budget() {
        let page = page_size();
        let (_dir, ckpt) = checkpoint(&[page, page, page]);
        let stream = Stream::new(ckpt.views(&["t0", "t1", "t2"]).unwrap(), 1).unwrap();
        // The thread holds t0 and waits for budget: close must wake it.
        assert!(until_it_waits(&stream).waiting);
        let mut stream = finishes("close() while the read-ahead waits", move || {
            let mut stream = stream;
            stream.close().unwrap();
            stream
        });
        assert!(!stream.thread_alive());
        assert!(stream.next().is_none());
        // Prefetched-but-never-yielded bytes were given back.
        assert_eq!(stream.stats().unwrap().in_use, 0);
        stream.close().unwrap();
    }

    #[test]
    fn explicit_release_returns_budget_and_keeps_data() {
        let page = page_size();
        let (_dir, ckpt) = checkpoint(&[2 * page, 2 * page]);
        let mut stream = Stream::new(ckpt.views(&["t0", "t1"]).unwrap(), 1 << 30).unwrap();
        let (view, slot) = stream.next().unwrap().unwrap();
        wait_until("read-ahead takes both tensors", || {
            stream.stats().unwrap().prefetched == 4 * page as u64
        });
        slot.release(&view).unwrap();
        slot.release(&view).unwrap();
        assert_eq!(stream.stats().unwrap().in_use, 2 * page as u64);
        assert!(view.bytes().iter().all(|&b| b == 0));
        drop(stream);
        // The view outlives its stream, and releasing it still works.
        slot.release(&view).unwrap();
        assert_eq!(view.len(), 2 * page);
    }

    #[test]
    fn skips_items_the_consumer_passed() {
        let page = page_size();
        let (_dir, ckpt) = checkpoint(&[page; 6]);
        let names: Vec<String> = (0..6).map(|i| format!("t{i}")).collect();
        // A window of one page: the thread can hold one item at a time, so it
        // must skip what the consumer already passed to make progress.
        let mut stream = Stream::new(ckpt.views(&names).unwrap(), page as u64).unwrap();
        for _ in 0..6 {
            stream.next().unwrap().unwrap();
        }
        assert!(stream.next().is_none());
        stream.close().unwrap();
        let stats = stream.stats().unwrap();
        assert!(stats.prefetched <= 6 * page as u64, "{stats:?}");
        assert_eq!(stats.in_use, 0);
    }

    #[test]
    fn close_lets_go_of_the_mappings() {
        let (dir, ckpt) = checkpoint(&[page_size(), page_size()]);
        let path = dir.path().join("m.safetensors");
        let mut stream = Stream::new(ckpt.views(&["t0", "t1"]).unwrap(), 1).unwrap();
        drop(ckpt);
        let (kept, _) = stream.next().unwrap().unwrap();
        let mapped = || {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            maps.lines().any(|l| l.ends_with(path.to_str().unwrap()))
        };
        stream.close().unwrap();
        assert!(stream.next().is_none());
        assert_eq!(stream.remaining(), 0);
        assert!(mapped(), "a handed-out view keeps its shard");
        drop(kept);
        assert!(!mapped(), "the closed stream pins nothing");
    }

    #[test]
    fn empty_stream_and_zero_byte_items() {
        let (_dir, ckpt) = checkpoint(&[0, 0]);
        let mut stream = Stream::new(Vec::new(), DEFAULT_WINDOW).unwrap();
        assert!(stream.next().is_none());
        let mut stream = Stream::new(ckpt.views(&["t0", "t1"]).unwrap(), 1).unwrap();
        assert!(!stream.thread_alive());
        assert_eq!(stream.next().unwrap().unwrap().0.len(), 0);
        assert_eq!(stream.next().unwrap().unwrap().0.len(), 0);
        assert!(stream.next().is_none());
    }

    #[test]
    fn shrunk_file_is_an_error_not_a_crash() {
        let page = page_size();
        let (dir, ckpt) = checkpoint(&[page, page]);
        let path = dir.path().join("m.safetensors");
        let len = std::fs::metadata(&path).unwrap().len();
        crate::reader::tests::shrink(&path, len - 10);
        let mut stream = Stream::new(ckpt.views(&["t0", "t1"]).unwrap(), 1 << 20).unwrap();
        assert!(stream.next().unwrap().is_ok());
        let e = stream.next().unwrap().unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::Truncated);
        assert_eq!(e.tensor.as_deref(), Some("t1"));
    }

    #[test]
    fn truncation_after_hand_out_is_reported_by_check_next_or_the_end() {
        let page = page_size();
        let sum = |v: &View| v.bytes().iter().map(|&b| u64::from(b)).sum::<u64>();
        for how in ["check", "next", "end"] {
            let (dir, ckpt) = checkpoint(&[page, 4 * page, 4 * page]);
            let path = dir.path().join("m.safetensors");
            let len = std::fs::metadata(&path).unwrap().len();
            let mut stream = Stream::new(ckpt.views(&["t1", "t2"]).unwrap(), 1).unwrap();
            let (t1, _) = stream.next().unwrap().unwrap();
            let (cut, victim) = if how == "end" {
                stream.check().unwrap();
                (2 * page as u64, stream.next().unwrap().unwrap().0)
            } else {
                (6 * page as u64, t1)
            };
            // Handed out (fstat said fine), then cut: reading it would SIGBUS.
            crate::reader::tests::shrink(&path, len - cut);
            let value = victim.info().name[1..].parse::<u64>().unwrap();
            assert!(sum(&victim) < value * 4 * page as u64, "{how}");
            let e = match how {
                "check" => stream.check().unwrap_err(),
                _ => stream.next().unwrap().unwrap_err(),
            };
            assert_eq!(e.kind, crate::error::ErrorKind::Truncated, "{how}");
            assert_eq!(e.tensor, Some(victim.info().name.clone()), "{how}");
        }
    }
}
