//! Parallel reads into a ring of caller-owned buffers: the host side of the
//! overlapped (GPU) load.
//!
//! Each item (a tensor's [`View`]) is split into chunks of at most one slot.
//! Chunk `s` always goes to slot `s % slots`, so worker threads (plain
//! `std::thread`s: no Python, no GIL) claim chunks in order and read each one
//! with `pread` ([`View::read_into`]) into its slot as soon as the chunk that
//! last used the slot (`s - slots`) has been released by the consumer. The
//! consumer takes chunks in order with [`Pipeline::next`], starts using the
//! slot (on a GPU: an asynchronous host-to-device copy out of pinned memory),
//! and calls [`Pipeline::release`] once the slot may be overwritten (the copy
//! finished). Up to `slots` chunks are in flight; nothing waits for a whole
//! tensor or shard.
//!
//! Reading with `pread` instead of through the mapping keeps the checkpoint
//! out of the process's resident set altogether (only the page cache holds
//! it), and a file cut short gives a short read, reported as
//! [`ErrorKind::Truncated`](crate::error::ErrorKind::Truncated) with the file
//! and tensor, never SIGBUS.
//!
//! [`Warmup`] is the other half of "start reading at once": while the caller
//! is still deciding the order (building its model), a thread reads the
//! tensors it will most likely ask for first into the page cache.

use crate::error::{Error, Result};
use crate::reader::View;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// One piece of one item, read into one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Position in the pipeline's order of chunks.
    pub seq: usize,
    /// Index of the item (tensor) in the order given to [`Pipeline::new`].
    pub item: usize,
    /// Offset of the chunk inside the item, in bytes.
    pub offset: u64,
    /// Length in bytes (0 only for an empty item).
    pub len: u64,
    /// The slot holding the chunk's bytes (`seq % slots`).
    pub slot: usize,
}

/// A caller-owned buffer the workers write chunks into.
#[derive(Debug, Clone, Copy)]
pub struct SlotBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a `SlotBuf` is an address range; who may write it when is decided
// by the pipeline's state (one worker per chunk, a slot reused only after the
// consumer released its previous chunk), under the state's lock.
unsafe impl Send for SlotBuf {}
unsafe impl Sync for SlotBuf {}

impl SlotBuf {
    /// # Safety
    /// `ptr..ptr + len` must be valid for writes for as long as a
    /// [`Pipeline`] using it exists (until it is closed or dropped), and must
    /// not be written by anyone else meanwhile.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> SlotBuf {
        SlotBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug)]
enum Fill {
    Pending,
    Done,
    Failed(Error),
}

#[derive(Debug)]
struct State {
    /// Chunks `[0, claimed)` were taken by a worker.
    claimed: usize,
    fill: Vec<Fill>,
    released: Vec<bool>,
    /// How many of `released` are true.
    released_count: usize,
    stop: bool,
    bytes_read: u64,
    /// Peak of chunks claimed and not yet released (at most the slot count).
    peak_in_flight: usize,
    /// Workers waiting for their next chunk's slot to be released.
    waiting: usize,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| Error::internal("pipeline state lock poisoned"))
    }
}

/// What the workers have done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub bytes_read: u64,
    pub claimed: usize,
    pub peak_in_flight: usize,
    /// Workers waiting for a slot: while all are, nothing moves until the
    /// consumer releases a chunk (or the pipeline is closed).
    pub waiting: usize,
}

/// Chunks of `items`, read by `threads` workers into a ring of slots. Dropping
/// it stops and joins the workers.
#[derive(Debug)]
pub struct Pipeline {
    chunks: Arc<[Chunk]>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    slots: usize,
    slot_len: usize,
    next: usize,
    failed: bool,
    total_bytes: u64,
}

impl Pipeline {
    /// Start reading `items` in this order into `slots` (chunks of the
    /// smallest slot's length) with `threads` workers (clamped to `1..=slots`).
    ///
    /// # Safety
    /// Every slot must satisfy [`SlotBuf::new`]'s contract until the returned
    /// pipeline is closed or dropped; the consumer reads a slot only between
    /// receiving a chunk in it ([`Pipeline::next`]) and releasing that chunk.
    pub unsafe fn new(items: Vec<View>, slots: Vec<SlotBuf>, threads: usize) -> Result<Pipeline> {
        let slot_len = slots.iter().map(|s| s.len).min().unwrap_or(0);
        if slot_len == 0 {
            return Err(Error::new(
                crate::error::ErrorKind::Io,
                "the pipeline needs at least one slot, and no empty slot",
            ));
        }
        let mut chunks = Vec::new();
        for (item, view) in items.iter().enumerate() {
            let nbytes = view.info().nbytes();
            let mut offset = 0;
            loop {
                let len = (nbytes - offset).min(slot_len as u64);
                let seq = chunks.len();
                chunks.push(Chunk {
                    seq,
                    item,
                    offset,
                    len,
                    slot: seq % slots.len(),
                });
                offset += len;
                if offset >= nbytes {
                    break;
                }
            }
        }
        let total_bytes = items.iter().map(|v| v.info().nbytes()).sum();
        let n = chunks.len();
        let chunks: Arc<[Chunk]> = chunks.into();
        let items: Arc<[View]> = items.into();
        let ring: Arc<[SlotBuf]> = slots.into();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                claimed: 0,
                fill: (0..n).map(|_| Fill::Pending).collect(),
                released: vec![false; n],
                released_count: 0,
                stop: false,
                bytes_read: 0,
                peak_in_flight: 0,
                waiting: 0,
            }),
            wake: Condvar::new(),
        });
        let mut pipeline = Pipeline {
            chunks: Arc::clone(&chunks),
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            slots: ring.len(),
            slot_len,
            next: 0,
            failed: false,
            total_bytes,
        };
        for i in 0..threads.clamp(1, ring.len()).min(n) {
            let (items, chunks, ring, shared) = (
                Arc::clone(&items),
                Arc::clone(&chunks),
                Arc::clone(&ring),
                Arc::clone(&shared),
            );
            let handle = std::thread::Builder::new()
                .name(format!("leanstream-reader-{i}"))
                .spawn(move || work(&items, &chunks, &ring, &shared))
                .map_err(|e| {
                    Error::new(
                        crate::error::ErrorKind::Io,
                        format!("cannot start a reader thread: {e}"),
                    )
                });
            match handle {
                Ok(handle) => pipeline.threads.push(handle),
                Err(e) => {
                    let _ = pipeline.close();
                    return Err(e);
                }
            }
        }
        Ok(pipeline)
    }

    /// All chunks, in order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Length of the chunks (the smallest slot's length).
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Chunks not yet handed out.
    pub fn remaining(&self) -> usize {
        self.chunks.len() - self.next
    }

    /// Wait for the next chunk to be in its slot and hand it out; `None` at
    /// the end (and after an error was returned). Fails at once, instead of
    /// waiting forever, if the chunk's slot still holds an unreleased chunk.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Result<Chunk>> {
        if self.failed || self.next >= self.chunks.len() {
            return None;
        }
        let seq = self.next;
        let mut st = match self.shared.lock() {
            Ok(st) => st,
            Err(e) => return Some(Err(e)),
        };
        loop {
            match std::mem::replace(&mut st.fill[seq], Fill::Pending) {
                Fill::Done => {
                    self.next += 1;
                    return Some(Ok(self.chunks[seq]));
                }
                Fill::Failed(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                Fill::Pending => {}
            }
            if seq >= self.slots && !st.released[seq - self.slots] {
                self.failed = true;
                return Some(Err(Error::internal(&format!(
                    "chunk {seq} waits for slot {} but chunk {} in it was never released",
                    seq % self.slots,
                    seq - self.slots
                ))));
            }
            if st.stop && st.claimed <= seq {
                self.failed = true;
                return Some(Err(Error::internal("the pipeline was closed")));
            }
            st = match self.shared.wake.wait(st) {
                Ok(st) => st,
                Err(_) => return Some(Err(Error::internal("pipeline state lock poisoned"))),
            };
        }
    }

    /// Let chunk `seq`'s slot be overwritten (its bytes were consumed).
    /// Idempotent; fails for a chunk not yet handed out.
    pub fn release(&mut self, seq: usize) -> Result<()> {
        if seq >= self.next {
            return Err(Error::internal(&format!(
                "release of chunk {seq}, which was not handed out (next is {})",
                self.next
            )));
        }
        {
            let mut st = self.shared.lock()?;
            if !std::mem::replace(&mut st.released[seq], true) {
                st.released_count += 1;
            }
        }
        self.shared.wake.notify_all();
        Ok(())
    }

    pub fn stats(&self) -> Result<Stats> {
        let st = self.shared.lock()?;
        Ok(Stats {
            bytes_read: st.bytes_read,
            claimed: st.claimed,
            peak_in_flight: st.peak_in_flight,
            waiting: st.waiting,
        })
    }

    /// Whether any worker is still running (not yet joined).
    pub fn threads_alive(&self) -> bool {
        self.threads.iter().any(|h| !h.is_finished())
    }

    /// Stop and join the workers (each finishes the read it is in). After
    /// this no slot is written again. Idempotent.
    pub fn close(&mut self) -> Result<()> {
        let stopped = self.shared.lock().map(|mut st| st.stop = true);
        self.shared.wake.notify_all();
        let mut joined = Ok(());
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                joined = Err(Error::internal("a reader thread panicked"));
            }
        }
        self.failed = true;
        stopped.and(joined)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// A worker: claim the next chunk once its slot is free, read it, report.
fn work(items: &[View], chunks: &[Chunk], ring: &[SlotBuf], shared: &Shared) {
    loop {
        let chunk = {
            let Ok(mut st) = shared.state.lock() else {
                return;
            };
            loop {
                if st.stop || st.claimed >= chunks.len() {
                    return;
                }
                let seq = st.claimed;
                if seq < ring.len() || st.released[seq - ring.len()] {
                    st.claimed += 1;
                    st.peak_in_flight = st.peak_in_flight.max(st.claimed - st.released_count);
                    break chunks[seq];
                }
                st.waiting += 1;
                st = match shared.wake.wait(st) {
                    Ok(mut st) => {
                        st.waiting -= 1;
                        st
                    }
                    Err(_) => return,
                };
            }
        };
        let view = &items[chunk.item];
        let result = if chunk.len == 0 {
            view.check_available()
        } else {
            let slot = ring[chunk.slot];
            // SAFETY: `chunk.len <= slot.len` (chunks are cut to the smallest
            // slot); the slot is valid for writes (SlotBuf::new's contract),
            // and nobody else touches it now: the previous chunk in it was
            // released by the consumer, the next one cannot be claimed before
            // this one is handed out and released.
            let dst = unsafe { std::slice::from_raw_parts_mut(slot.ptr, chunk.len as usize) };
            view.read_into(chunk.offset, dst)
        };
        let Ok(mut st) = shared.state.lock() else {
            return;
        };
        match result {
            Ok(()) => {
                st.bytes_read += chunk.len;
                st.fill[chunk.seq] = Fill::Done;
            }
            Err(e) => {
                // Nothing after a failed chunk will be used: stop reading.
                st.fill[chunk.seq] = Fill::Failed(e);
                st.stop = true;
            }
        }
        drop(st);
        shared.wake.notify_all();
    }
}

/// A background thread that reads `items` in order into the page cache (into
/// a scratch buffer it throws away) until it has gone through `budget` bytes,
/// reached the end, or is stopped. Pieces already in the page cache
/// ([`View::cached`]) are skipped, not read: on a warm cache it costs a few
/// `mincore` calls. Errors end it quietly: the real read reports them.
#[derive(Debug)]
pub struct Warmup {
    stop: Arc<AtomicBool>,
    bytes_read: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Bytes read per `pread` by [`Warmup`] (between two checks of `stop`).
const WARMUP_PIECE: u64 = 4 << 20;

impl Warmup {
    pub fn start(items: Vec<View>, budget: u64) -> Result<Warmup> {
        Warmup::start_with(items, budget, WARMUP_PIECE, View::cached)
    }

    /// [`Warmup::start`] with the piece size and the residency test given
    /// (tests pass a fake one: what the kernel keeps cached is not theirs to
    /// decide).
    fn start_with<F>(items: Vec<View>, budget: u64, piece: u64, resident: F) -> Result<Warmup>
    where
        F: Fn(&View, u64, u64) -> bool + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes_read = Arc::new(AtomicU64::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&bytes_read));
        let thread = std::thread::Builder::new()
            .name("leanstream-warmup".into())
            .spawn(move || warm(&items, budget, piece, &flag, &count, resident))
            .map_err(|e| {
                Error::new(
                    crate::error::ErrorKind::Io,
                    format!("cannot start the warm-up thread: {e}"),
                )
            })?;
        Ok(Warmup {
            stop,
            bytes_read,
            thread: Some(thread),
        })
    }

    /// Bytes read so far (pieces found in the page cache are not counted).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Stop (after the current piece) and join. Idempotent; returns the bytes read.
    pub fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.thread.take() {
            let _ = handle.join();
        }
        self.bytes_read()
    }

    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for Warmup {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The warm-up thread's body: go through `items` in pieces of at most `piece`
/// bytes, until `budget` bytes were gone through or `stop` is set (checked
/// before each piece); read each piece that `resident(view, offset, len)` says
/// is not in the page cache, and add its length to `bytes_read`. A read error
/// ends it.
fn warm(
    items: &[View],
    budget: u64,
    piece: u64,
    stop: &AtomicBool,
    bytes_read: &AtomicU64,
    resident: impl Fn(&View, u64, u64) -> bool,
) {
    let mut scratch = Vec::new();
    let mut left = budget;
    for view in items {
        let nbytes = view.info().nbytes();
        let mut offset = 0;
        while offset < nbytes && left > 0 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let len = (nbytes - offset).min(left).min(piece);
            // Still being downloaded: reading from the disk is not what
            // these bytes need (the downloader's writes put them in the cache).
            if !view.arrived(offset, len) {
                return;
            }
            // already cached (a warm load): nothing to do, copy nothing
            if !resident(view, offset, len) {
                // `len <= piece`, a buffer length
                scratch.resize(scratch.len().max(len as usize), 0);
                if view
                    .read_into(offset, &mut scratch[..len as usize])
                    .is_err()
                {
                    return;
                }
                bytes_read.fetch_add(len, Ordering::Relaxed);
            }
            (offset, left) = (offset + len, left - len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::reader::tests::{checkpoint_of, finishes, shrink, wait_until};
    use crate::reader::Checkpoint;
    use std::sync::mpsc;
    use std::sync::Mutex;

    /// A checkpoint of tensors `t0, t1, ...` of the given sizes, whose bytes
    /// are a function of (tensor, position) so misplaced chunks show.
    fn checkpoint(sizes: &[usize]) -> (tempfile::TempDir, Checkpoint) {
        checkpoint_of(sizes, |i, j| (j * 7 + i * 31 + j / 251) as u8)
    }

    fn ring(slots: usize, len: usize) -> (Vec<Vec<u8>>, Vec<SlotBuf>) {
        let mut bufs: Vec<Vec<u8>> = (0..slots).map(|_| vec![0xAA; len]).collect();
        // SAFETY: the vectors outlive every pipeline of these tests (they are
        // returned to and held by the caller) and are read only per contract.
        let slots = bufs
            .iter_mut()
            .map(|b| unsafe { SlotBuf::new(b.as_mut_ptr(), b.len()) })
            .collect();
        (bufs, slots)
    }

    /// Run the pipeline to the end, releasing each chunk after `lag` more were
    /// taken, and reassemble each item from the slots.
    fn collect(ckpt: &Checkpoint, names: &[&str], slots: usize, len: usize, threads: usize) {
        let (bufs, ring_slots) = ring(slots, len);
        let views = ckpt.views(names).unwrap();
        let mut out: Vec<Vec<u8>> = views.iter().map(|v| vec![0; v.len()]).collect();
        // SAFETY: `bufs` outlives the pipeline (dropped at the end of this fn,
        // after `pipeline`, declared later).
        let mut pipeline = unsafe { Pipeline::new(views.clone(), ring_slots, threads) }.unwrap();
        let mut held = std::collections::VecDeque::new();
        let lag = slots.saturating_sub(1);
        while let Some(chunk) = pipeline.next() {
            let c = chunk.unwrap();
            assert_eq!(c.slot, c.seq % slots);
            let (off, n) = (c.offset as usize, c.len as usize);
            out[c.item][off..off + n].copy_from_slice(&bufs[c.slot][..n]);
            held.push_back(c.seq);
            while held.len() > lag {
                pipeline.release(held.pop_front().unwrap()).unwrap();
            }
        }
        for (view, bytes) in views.iter().zip(&out) {
            assert_eq!(view.bytes(), &bytes[..], "{}", view.info().name);
        }
        let stats = pipeline.stats().unwrap();
        assert!(stats.peak_in_flight <= slots, "{stats:?}");
        assert_eq!(stats.bytes_read, pipeline.total_bytes());
        pipeline.close().unwrap();
        assert!(!pipeline.threads_alive());
    }

    #[test]
    fn every_chunk_lands_in_order_whatever_the_ring() {
        let (_dir, ckpt) = checkpoint(&[0, 1, 1000, 4096, 12_345, 3, 70_000]);
        let names = ["t6", "t0", "t2", "t1", "t4", "t3", "t5", "t2"];
        for (slots, len, threads) in [
            (1, 1, 1),
            (1, 4096, 3),
            (2, 7, 2),
            (3, 1000, 3),
            (4, 4096, 4),
            (8, 65_536, 2),
            (2, 1 << 20, 8),
        ] {
            collect(&ckpt, &names, slots, len, threads);
        }
    }

    #[test]
    fn chunks_cover_each_item_and_use_the_smallest_slot() {
        let (_dir, ckpt) = checkpoint(&[10, 0, 25]);
        let (_bufs, mut slots) = ring(3, 10);
        // SAFETY: a shorter slot over the same (held) buffer.
        slots[1] = unsafe { SlotBuf::new(slots[1].ptr, 8) };
        let views = ckpt.views(&["t0", "t1", "t2"]).unwrap();
        // SAFETY: `_bufs` outlives the pipeline.
        let pipeline = unsafe { Pipeline::new(views, slots, 1) }.unwrap();
        assert_eq!(pipeline.slot_len(), 8);
        let got: Vec<(usize, u64, u64)> = pipeline
            .chunks()
            .iter()
            .map(|c| (c.item, c.offset, c.len))
            .collect();
        let want = [(0, 0, 8), (0, 8, 2), (1, 0, 0), (2, 0, 8), (2, 8, 8)];
        assert_eq!(&got[..5], &want);
        assert_eq!(got[5..], [(2, 16, 8), (2, 24, 1)]);
    }

    #[test]
    fn workers_wait_for_released_slots() {
        let (_dir, ckpt) = checkpoint(&[100; 10]);
        let names: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        let (_bufs, slots) = ring(3, 100);
        // SAFETY: `_bufs` outlives the pipeline.
        let mut pipeline = unsafe { Pipeline::new(ckpt.views(&names).unwrap(), slots, 4) }.unwrap();
        // Once every worker (3: one per slot) waits, nothing can move until a
        // release; a worker that did not wait would claim on and end instead.
        wait_until("the workers wait for a slot", || {
            pipeline.stats().unwrap().waiting == 3 || !pipeline.threads_alive()
        });
        // Nothing released: exactly the ring was read, no more.
        let stats = pipeline.stats().unwrap();
        assert_eq!(
            (stats.claimed, stats.waiting, stats.bytes_read),
            (3, 3, 300)
        );
        for _ in 0..3 {
            pipeline.next().unwrap().unwrap();
        }
        // Chunk 3 needs slot 0, still held by chunk 0: an error, not a hang.
        let e = pipeline.next().unwrap().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("never released"), "{e}");
        assert!(pipeline.next().is_none());
    }

    #[test]
    fn release_needs_a_chunk_handed_out() {
        let (_dir, ckpt) = checkpoint(&[10]);
        let (_bufs, slots) = ring(1, 4);
        // SAFETY: `_bufs` outlives the pipeline.
        let mut pipeline =
            unsafe { Pipeline::new(ckpt.views(&["t0"]).unwrap(), slots, 1) }.unwrap();
        assert!(pipeline.release(0).is_err());
        pipeline.next().unwrap().unwrap();
        pipeline.release(0).unwrap();
        pipeline.release(0).unwrap();
        assert!(pipeline.release(1).is_err());
    }

    #[test]
    fn an_empty_ring_is_refused() {
        let (_dir, ckpt) = checkpoint(&[10]);
        let views = ckpt.views(&["t0"]).unwrap();
        // SAFETY: no slots at all.
        assert!(unsafe { Pipeline::new(views.clone(), vec![], 1) }.is_err());
        let (_bufs, slots) = ring(2, 0);
        // SAFETY: zero-length slots are never written.
        assert!(unsafe { Pipeline::new(views, slots, 1) }.is_err());
    }

    #[test]
    fn close_joins_workers_waiting_for_slots() {
        let (_dir, ckpt) = checkpoint(&[1000; 20]);
        let names: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
        let (_bufs, slots) = ring(2, 100);
        // SAFETY: `_bufs` outlives the pipeline.
        let mut pipeline = unsafe { Pipeline::new(ckpt.views(&names).unwrap(), slots, 2) }.unwrap();
        pipeline.next().unwrap().unwrap();
        // Both workers wait for a slot (chunk 0 is held): close must wake them.
        wait_until("the workers wait for a slot", || {
            pipeline.stats().unwrap().waiting == 2
        });
        let mut pipeline = finishes("close() with waiting workers", move || {
            pipeline.close().unwrap();
            pipeline
        });
        assert!(!pipeline.threads_alive());
        assert!(pipeline.next().is_none());
        pipeline.close().unwrap();
    }

    #[test]
    fn a_file_cut_short_is_truncated_naming_file_and_tensor() {
        let (dir, ckpt) = checkpoint(&[4096, 4096, 4096]);
        let path = dir.path().join("m.safetensors");
        let len = std::fs::metadata(&path).unwrap().len();
        shrink(&path, len - 4096 - 100);
        let (_bufs, slots) = ring(2, 1024);
        let views = ckpt.views(&["t0", "t1", "t2"]).unwrap();
        // SAFETY: `_bufs` outlives the pipeline.
        let mut pipeline = unsafe { Pipeline::new(views, slots, 2) }.unwrap();
        let err = loop {
            match pipeline.next().unwrap() {
                Ok(c) => pipeline.release(c.seq).unwrap(),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind, ErrorKind::Truncated, "{err}");
        assert!(err.tensor.is_some(), "{err}");
        assert_eq!(err.file.as_deref(), Some(path.as_path()));
        assert!(pipeline.next().is_none());
    }

    /// The views of a checkpoint of U8 tensors `t0, t1, ...` of these sizes.
    fn views_of(sizes: &[usize]) -> (tempfile::TempDir, Vec<View>) {
        let (dir, ckpt) = checkpoint(sizes);
        let names: Vec<String> = (0..sizes.len()).map(|i| format!("t{i}")).collect();
        (dir, ckpt.views(&names).unwrap())
    }

    /// Piece size of the warm-up tests below.
    const PIECE: u64 = 1000;

    /// Run the warm-up loop over `views` with [`PIECE`] and this budget; the
    /// residency test answers from `resident` ((tensor, offset) of the pieces
    /// in the page cache) and may act through `hook`. Returns the bytes read
    /// and every piece the loop asked about, in order.
    fn run_warm(
        views: &[View],
        budget: u64,
        resident: &[(&str, u64)],
        stop: &AtomicBool,
        hook: impl Fn(usize),
    ) -> (u64, Vec<(String, u64, u64)>) {
        let asked = Mutex::new(Vec::new());
        let read = AtomicU64::new(0);
        warm(views, budget, PIECE, stop, &read, |view, offset, len| {
            let mut asked = asked.lock().unwrap();
            asked.push((view.info().name.clone(), offset, len));
            assert!(asked.len() < 100, "the warm-up loops: {asked:?}");
            hook(asked.len());
            resident.contains(&(view.info().name.as_str(), offset))
        });
        (read.into_inner(), asked.into_inner().unwrap())
    }

    fn pieces(list: &[(&str, u64, u64)]) -> Vec<(String, u64, u64)> {
        list.iter().map(|&(n, o, l)| (n.to_owned(), o, l)).collect()
    }

    #[test]
    fn warmup_reads_each_piece_not_cached_once_in_order() {
        let (_dir, views) = views_of(&[2500, 0, 1000, 7]);
        let go = AtomicBool::new(false);
        let all = pieces(&[
            ("t0", 0, 1000),
            ("t0", 1000, 1000),
            ("t0", 2000, 500),
            ("t2", 0, 1000),
            ("t3", 0, 7),
        ]);
        // Nothing cached: every byte is read.
        let (read, asked) = run_warm(&views, u64::MAX, &[], &go, |_| {});
        assert_eq!((read, &asked), (3507, &all));
        // Cached pieces are skipped (piece sizes differ: the sum tells which).
        let (read, asked) = run_warm(&views, u64::MAX, &[("t0", 1000), ("t3", 0)], &go, |_| {});
        assert_eq!((read, &asked), (2500, &all));
        let cached: Vec<(&str, u64)> = all.iter().map(|(n, o, _)| (n.as_str(), *o)).collect();
        assert_eq!(run_warm(&views, u64::MAX, &cached, &go, |_| {}).0, 0);
        // The order given is the order read, duplicates included.
        let order = vec![views[3].clone(), views[0].clone(), views[3].clone()];
        let (read, asked) = run_warm(&order, u64::MAX, &[], &go, |_| {});
        let want = [
            ("t3", 0, 7),
            ("t0", 0, 1000),
            ("t0", 1000, 1000),
            ("t0", 2000, 500),
        ];
        assert_eq!(
            (read, asked),
            (2514, pieces(&[&want[..], &want[..1]].concat()))
        );
    }

    #[test]
    fn warmup_goes_through_its_budget_cached_pieces_included() {
        let (_dir, views) = views_of(&[2500, 1000]);
        let go = AtomicBool::new(false);
        let (read, asked) = run_warm(&views, 2300, &[], &go, |_| {});
        let want = pieces(&[("t0", 0, 1000), ("t0", 1000, 1000), ("t0", 2000, 300)]);
        assert_eq!((read, asked), (2300, want.clone()));
        // A cached piece costs no read but counts against the budget.
        let (read, asked) = run_warm(&views, 2300, &[("t0", 0)], &go, |_| {});
        assert_eq!((read, asked), (1300, want));
        assert_eq!(run_warm(&views, 1, &[], &go, |_| {}).0, 1);
        assert_eq!(run_warm(&views, 0, &[], &go, |_| {}), (0, vec![]));
    }

    #[test]
    fn warmup_stops_after_the_piece_in_progress() {
        let (_dir, views) = views_of(&[2500, 1000]);
        let stop = AtomicBool::new(false);
        // Stopped while the third piece is looked at: it is still read, no
        // more after it.
        let (read, asked) = run_warm(&views, u64::MAX, &[], &stop, |n| {
            if n == 3 {
                stop.store(true, Ordering::Relaxed);
            }
        });
        assert_eq!((read, asked.len()), (2500, 3));
        // Stopped before it started: nothing.
        assert_eq!(run_warm(&views, u64::MAX, &[], &stop, |_| {}), (0, vec![]));
    }

    #[test]
    fn warmup_ends_quietly_at_a_read_error() {
        let (dir, views) = views_of(&[2500, 1000]);
        let path = dir.path().join("m.safetensors");
        let len = std::fs::metadata(&path).unwrap().len();
        shrink(&path, len - 300);
        let go = AtomicBool::new(false);
        // t0 lies below the cut and is read; reading t1 fails, and nothing
        // after it is tried.
        let order = [views[0].clone(), views[1].clone(), views[0].clone()];
        let (read, asked) = run_warm(&order, u64::MAX, &[], &go, |_| {});
        assert_eq!((read, asked.len()), (2500, 4));
    }

    #[test]
    fn warmup_thread_runs_to_the_end_or_stops_and_joins() {
        let (_dir, views) = views_of(&[2500, 1000]);
        let mut warm = Warmup::start_with(views.clone(), u64::MAX, PIECE, |_, _, _| false).unwrap();
        wait_until("the warm-up ends", || !warm.is_running());
        assert_eq!(
            (warm.bytes_read(), warm.stop(), warm.stop()),
            (3500, 3500, 3500)
        );

        // Stopped while it looks at its second piece: that piece is read, the
        // thread ends before the third, and stop() joins it.
        let (at_second, reached) = mpsc::channel();
        let (go, wait) = mpsc::channel::<()>();
        let seen = AtomicU64::new(0);
        let mut warm = Warmup::start_with(views, u64::MAX, PIECE, move |_, _, _| {
            if seen.fetch_add(1, Ordering::Relaxed) == 1 {
                at_second.send(()).unwrap();
                wait.recv().unwrap();
            }
            false
        })
        .unwrap();
        reached.recv_timeout(crate::reader::tests::HANG).unwrap();
        warm.stop.store(true, Ordering::Relaxed);
        go.send(()).unwrap();
        let mut warm = finishes("the warm-up stops", move || {
            warm.stop();
            warm
        });
        assert!(!warm.is_running());
        assert_eq!(warm.stop(), 2000);
    }
}
