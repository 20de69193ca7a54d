//! A shard truncated while it is mapped becomes an error, not a SIGBUS.
//!
//! Touching a mapped page that lies past the end of a file that shrank raises
//! SIGBUS, which kills the process. The reader checks the file's size (fstat)
//! before it hands a view out, but nothing can check in advance for a
//! truncation that happens *while* the bytes are read (by torch or
//! bitsandbytes, or by the read-ahead thread faulting pages in). So:
//!
//! - every shard mapping is registered here as a [`Region`], in a table that a
//!   signal handler can read without locks or allocation: blocks of slots that
//!   are allocated outside the handler and never freed;
//! - a SIGBUS handler (installed by the first [`Region::register`], and again
//!   by [`ensure_installed`] if something replaced it) looks the faulting address up.
//!   Inside a live region, it maps anonymous zero pages (`MAP_FIXED |
//!   MAP_PRIVATE | MAP_ANONYMOUS`, read-only) over the region from the faulting
//!   page to its end (all of it lies past the end of the file), records the
//!   offset of that page ([`Region::lost_from`]) and returns: the access
//!   completes and reads zeros;
//! - consumers check [`Region::lost_from`] after they have used the bytes
//!   (`View::check`, the stream) and report `ErrorKind::Truncated`, so the zeros
//!   never end up in a model unnoticed.
//!
//! A SIGBUS outside every region (or one sent with `kill`) is not ours: the
//! handler puts the previous action back and lets the signal take its course,
//! so the fault recurs and reaches the previous handler (Python's
//! `faulthandler`, Rust's stack-overflow handler) or kills the process, exactly
//! as without leanstream. The handler is async-signal-safe: atomics, `mmap`,
//! `sigaction` and `raise` only.

use crate::reader::page_size;
use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Slots per block of the registry; more blocks are added as needed.
const SLOTS: usize = 64;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

/// One registered mapping. `gen` changes on every (un)registration, so the
/// handler can tell a consistent read of `start`/`len` (a seqlock).
struct Slot {
    state: AtomicU8,
    gen: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    /// Offset (from `start`) of the first page replaced by zeros; `usize::MAX`: none.
    lost_from: AtomicUsize,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            state: AtomicU8::new(FREE),
            gen: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            lost_from: AtomicUsize::new(usize::MAX),
        }
    }

    /// `(start, len)` if the slot is live (read consistently), else `None`.
    fn live_range(&self) -> Option<(usize, usize)> {
        let gen = self.gen.load(Ordering::Acquire);
        if self.state.load(Ordering::Acquire) != LIVE {
            return None;
        }
        let (start, len) = (
            self.start.load(Ordering::Acquire),
            self.len.load(Ordering::Acquire),
        );
        let same = self.gen.load(Ordering::Acquire) == gen;
        (same && self.state.load(Ordering::Acquire) == LIVE).then_some((start, len))
    }
}

struct Block {
    slots: [Slot; SLOTS],
    next: AtomicPtr<Block>,
}

/// The registry: a list of blocks, newest first. Blocks are leaked on purpose
/// (the handler may be walking them at any time); a process needs one per 64
/// simultaneously open shards.
static HEAD: AtomicPtr<Block> = AtomicPtr::new(ptr::null_mut());

/// The SIGBUS action that was in place when ours was installed (leaked, for
/// the same reason as the blocks). Null: not installed yet.
static PREV: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());
/// Set while a foreign SIGBUS is handed back to the previous action: a second
/// one arriving meanwhile means the handlers form a cycle; it gets the default.
static CHAINING: AtomicBool = AtomicBool::new(false);
/// The page size, for the handler (which cannot call `sysconf`).
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// Serializes installs (never taken by the handler).
static INSTALL: Mutex<()> = Mutex::new(());
/// How many faults the handler repaired in this process (tests, diagnostics).
static REPAIRED: AtomicUsize = AtomicUsize::new(0);

/// A mapping registered with the SIGBUS handler; unregistered on drop, which
/// must happen before the mapping is unmapped (declare it before the mapping
/// in a struct: fields drop in declaration order).
#[derive(Debug)]
pub struct Region {
    slot: &'static Slot,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("start", &self.start.load(Ordering::Relaxed))
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("lost_from", &self.lost_from.load(Ordering::Relaxed))
            .finish()
    }
}

impl Region {
    /// Register the mapping `[ptr, ptr + len)` (page-aligned `ptr`, as `mmap`
    /// returns it), installing the handler if it is not in place.
    pub fn register(ptr: *const u8, len: usize) -> Region {
        ensure_installed();
        let slot = claim_slot();
        slot.gen.fetch_add(1, Ordering::AcqRel);
        slot.start.store(ptr as usize, Ordering::Release);
        slot.len.store(len, Ordering::Release);
        slot.lost_from.store(usize::MAX, Ordering::Release);
        slot.state.store(LIVE, Ordering::Release);
        Region { slot }
    }

    /// Offset from the start of the mapping from which on the bytes were
    /// replaced by zeros because the file shrank under them; `None` if the
    /// mapping is intact.
    pub fn lost_from(&self) -> Option<u64> {
        match self.slot.lost_from.load(Ordering::Acquire) {
            usize::MAX => None,
            offset => Some(offset as u64),
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.slot.state.store(BUSY, Ordering::Release);
        self.slot.gen.fetch_add(1, Ordering::AcqRel);
        self.slot.state.store(FREE, Ordering::Release);
    }
}

/// How many SIGBUS faults in registered mappings were repaired so far.
pub fn repaired() -> usize {
    REPAIRED.load(Ordering::Relaxed)
}

/// A free slot, marked `BUSY`; adds a block when all are taken.
fn claim_slot() -> &'static Slot {
    loop {
        let mut block = HEAD.load(Ordering::Acquire);
        while !block.is_null() {
            // SAFETY: blocks are never freed.
            let b: &'static Block = unsafe { &*block };
            for slot in &b.slots {
                if slot
                    .state
                    .compare_exchange(FREE, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return slot;
                }
            }
            block = b.next.load(Ordering::Acquire);
        }
        let new: &'static mut Block = Box::leak(Box::new(Block {
            slots: [const { Slot::new() }; SLOTS],
            next: AtomicPtr::new(ptr::null_mut()),
        }));
        let mut head = HEAD.load(Ordering::Acquire);
        loop {
            new.next.store(head, Ordering::Release);
            match HEAD.compare_exchange(head, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(current) => head = current,
            }
        }
    }
}

/// Install the handler unless it is the current SIGBUS action (another
/// library, or `faulthandler.enable()`, may have replaced it since). Called
/// for every registration and before each view is handed out; cheap (one
/// `sigaction` query).
pub fn ensure_installed() {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    PAGE.store(page_size(), Ordering::Relaxed);
    // SAFETY: plain sigaction calls on zero-initialized (valid) structs.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, ptr::null(), &mut current) != 0 {
            return;
        }
        if current.sa_sigaction == on_sigbus as *const () as libc::sighandler_t {
            return;
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        PREV.store(Box::into_raw(Box::new(current)), Ordering::Release);
        CHAINING.store(false, Ordering::Release);
        libc::sigaction(libc::SIGBUS, &action, ptr::null_mut());
    }
}

extern "C" fn on_sigbus(sig: c_int, info: *mut libc::siginfo_t, _context: *mut c_void) {
    // SAFETY: errno is thread-local; the handler must leave it as it found it.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: `info` comes from the kernel (SA_SIGINFO), or is null.
    if !unsafe { repair(info) } {
        let sent = info.is_null() || unsafe { (*info).si_code } <= 0;
        // SAFETY: only sigaction and raise, both async-signal-safe.
        unsafe { pass_on(sig, sent) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// If the fault lies in a registered region, replace the rest of the region
/// by zero pages, record where, and return true.
unsafe fn repair(info: *const libc::siginfo_t) -> bool {
    // SAFETY: the caller passes the kernel's siginfo or null.
    let Some(info) = (unsafe { info.as_ref() }) else {
        return false;
    };
    if info.si_code <= 0 {
        return false; // sent by kill/raise/sigqueue: no fault to repair
    }
    // SAFETY: a kernel-generated SIGBUS carries the faulting address.
    let addr = unsafe { info.si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    let mut block = HEAD.load(Ordering::Acquire);
    while !block.is_null() {
        // SAFETY: blocks are never freed.
        let b = unsafe { &*block };
        for slot in &b.slots {
            let Some((start, len)) = slot.live_range() else {
                continue;
            };
            if addr < start || addr - start >= len {
                continue;
            }
            let from = (addr - start) & !(page - 1);
            let end = len.div_ceil(page) * page;
            // SAFETY: [start + from, start + end) lies inside the live mapping
            // of this region (mappings span whole pages): replacing it with
            // zero pages invalidates nothing that was not already gone.
            let mapped = unsafe {
                libc::mmap(
                    (start + from) as *mut c_void,
                    end - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped == libc::MAP_FAILED {
                return false;
            }
            slot.lost_from.fetch_min(from, Ordering::AcqRel);
            REPAIRED.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        block = b.next.load(Ordering::Acquire);
    }
    false
}

/// Hand a SIGBUS that is not ours back to the action that was there before
/// us: restore it, then let the fault recur on return (or re-raise a sent
/// signal, delivered when the handler returns). The previous action's
/// handler then sees the signal exactly as it would have without us.
unsafe fn pass_on(sig: c_int, sent: bool) {
    let prev = PREV.load(Ordering::Acquire);
    let cycle = CHAINING.swap(true, Ordering::AcqRel);
    // SAFETY: a non-null PREV points at a leaked, never-freed sigaction.
    let restore: libc::sigaction = match unsafe { prev.as_ref() } {
        Some(prev) if !cycle => *prev,
        _ => unsafe { default_action() },
    };
    let ignored = restore.sa_sigaction == libc::SIG_IGN;
    // A fault cannot be ignored (it would recur forever): default action.
    let restore = if ignored && !sent {
        unsafe { default_action() }
    } else {
        restore
    };
    // SAFETY: sigaction and raise are async-signal-safe.
    unsafe {
        libc::sigaction(sig, &restore, ptr::null_mut());
        if sent {
            libc::raise(sig);
        }
    }
}

unsafe fn default_action() -> libc::sigaction {
    // SAFETY: an all-zero sigaction is valid: SIG_DFL, empty mask, no flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = libc::SIG_DFL;
    action
}

#[cfg(test)]
mod tests {
    use super::*;
    use memmap2::Mmap;
    use std::fs::File;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        (dir, path)
    }

    fn touch_every_page(bytes: &[u8]) -> u64 {
        let mut sum = 0u64;
        for at in (0..bytes.len()).step_by(page_size()) {
            // SAFETY: in bounds; volatile so that the load happens.
            sum += u64::from(unsafe { std::ptr::read_volatile(bytes.as_ptr().add(at)) });
        }
        sum
    }

    #[test]
    fn truncation_under_a_registered_mapping_reads_zeros_and_is_recorded() {
        let page = page_size();
        let (_dir, path) = file_of(10 * page);
        let file = File::open(&path).unwrap();
        // SAFETY: read-only mapping of a file this test owns.
        let mmap = unsafe { Mmap::map(&file) }.unwrap();
        let region = Region::register(mmap.as_ptr(), mmap.len());
        assert_eq!(region.lost_from(), None);
        assert_eq!(touch_every_page(&mmap), 7 * 10);
        let before = repaired();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len((4 * page + 100) as u64)
            .unwrap();
        // Without the handler this would kill the test binary with SIGBUS.
        assert_eq!(touch_every_page(&mmap), 7 * 5);
        assert_eq!(region.lost_from(), Some(5 * page as u64));
        assert!(repaired() > before);
        // The pages below the new end are intact; the lost ones read zeros.
        assert_eq!(mmap[4 * page], 7);
        assert_eq!(mmap[9 * page + 1], 0);
        drop(region);
        drop(mmap);
    }

    #[test]
    fn slots_are_reused_and_the_registry_grows() {
        let buf = [0u8; 16];
        let regions: Vec<Region> = (0..3 * SLOTS)
            .map(|i| Region::register(buf.as_ptr().wrapping_add(i), 1))
            .collect();
        let mut seen = std::collections::HashSet::new();
        for r in &regions {
            assert!(seen.insert(r.slot as *const Slot as usize));
            assert!(r.slot.live_range().is_some());
        }
        drop(regions);
        // Freed slots are taken again before any new block is added.
        let again = Region::register(buf.as_ptr(), 1);
        let mut block = HEAD.load(Ordering::Acquire);
        let mut blocks = 0;
        while !block.is_null() {
            blocks += 1;
            block = unsafe { &*block }.next.load(Ordering::Acquire);
        }
        assert!(blocks >= 3);
        assert!(again.slot.live_range().is_some());
    }

    #[test]
    fn a_fault_outside_every_region_still_kills() {
        let page = page_size();
        let (_dir, path) = file_of(4 * page);
        let file = File::open(&path).unwrap();
        // SAFETY: read-only mapping of a file this test owns, never registered.
        let mmap = unsafe { Mmap::map(&file) }.unwrap();
        ensure_installed();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        // SAFETY: the child only touches memory and exits; it runs no test
        // harness code. The parent only waits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let sum = touch_every_page(&mmap);
            unsafe { libc::_exit(if sum > 0 { 3 } else { 4 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGBUS);
    }
}
