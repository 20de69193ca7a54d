//! Open a checkpoint (folder, single file, `*.index.json`, or list of shards),
//! map every shard read-only and validate every header before anything is
//! read, and index tensor names to where their bytes live.
//!
//! Shards are mapped with `Mmap::map`: `PROT_READ`, `MAP_SHARED`. Nothing is
//! ever written through a mapping, and pages dropped with `MADV_DONTNEED` are
//! faulted in again from the page cache, so releasing a range never changes
//! what a live view reads.
//!
//! A shard may still shrink or be rewritten by another process while it is
//! mapped. Each mapping is registered with [`crate::fault`], so reading a page
//! that was cut off reads zeros instead of killing the process with SIGBUS;
//! [`View::check`] then reports [`ErrorKind::Truncated`] for every tensor whose
//! bytes were touched by that, or whose file changed size or mtime since it
//! was opened.

use crate::arrival::Arrival;
use crate::error::{Error, ErrorKind, Result};
use crate::fault::Region;
use crate::header::{self, Dtype, Header, Json};
use memmap2::{Advice, Mmap, UncheckedAdvice};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

/// File name of the sharded-checkpoint index inside a folder.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of a single-file checkpoint inside a folder.
pub const SINGLE_FILE: &str = "model.safetensors";
/// How any index without a variant ends (`diffusion_pytorch_model.safetensors.index.json`).
const INDEX_SUFFIX: &str = ".safetensors.index.json";
/// Largest index file read (real ones are a few hundred KB).
pub const MAX_INDEX_SIZE: u64 = 100_000_000;

/// The system page size.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|&s| s > 0)
            .unwrap_or(4096)
    })
}

/// Open `path` for reading without blocking (a FIFO would block `open`
/// until a writer appears) and check that it is a regular file.
fn open_regular(path: &Path, what: &str) -> Result<(File, std::fs::Metadata)> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(&e, path, &format!("open {what}")))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(&e, path, &format!("stat {what}")))?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::Io,
            format!("is not a regular file (expected a {what})"),
        )
        .in_file(path));
    }
    Ok((file, meta))
}

/// One mapped, validated shard file.
#[derive(Debug)]
pub struct Shard {
    path: PathBuf,
    file: File,
    /// Size and modification time at open: a change means the bytes may differ.
    opened: (u64, Option<SystemTime>),
    /// Registered with the SIGBUS handler; dropped (unregistered) before `mmap`.
    region: Region,
    mmap: Mmap,
    header: Header,
    /// Set while the file is still being downloaded: which bytes it holds yet.
    arrival: Option<Arc<Arrival>>,
}

/// How long a wait for downloaded bytes sleeps between checks that nothing
/// asked it to stop (a closed stream, a signal in the Python thread).
pub const ARRIVAL_POLL: std::time::Duration = std::time::Duration::from_millis(50);

impl Shard {
    /// Open, map and validate `path` (absolute).
    pub fn open(path: &Path) -> Result<Shard> {
        let (mut file, meta) = open_regular(path, ".safetensors shard")?;
        if meta.len() < 8 {
            // Too short to map usefully; read it so the parser reports it.
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .map_err(|e| Error::io(&e, path, "read shard"))?;
            header::parse(&bytes).map_err(|e| e.in_file(path))?;
            return Err(Error::new(ErrorKind::Truncated, "shorter than 8 bytes").in_file(path));
        }
        // SAFETY: the mapping is read-only (PROT_READ, MAP_SHARED). If another
        // process truncates the file while it is mapped, touching the lost
        // pages raises SIGBUS: the region registered below turns that into
        // zeros plus a mark that `View::check` reports, and
        // `View::check_available` re-checks the file (fstat) before each view
        // is handed out.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&e, path, "map shard"))?;
        let region = Region::register(mmap.as_ptr(), mmap.len());
        let header = header::parse(&mmap).map_err(|e| e.in_file(path))?;
        if let Some(lost) = region.lost_from() {
            return Err(Error::new(
                ErrorKind::Truncated,
                format!("the file shrank below byte {lost} while its header was read"),
            )
            .in_file(path));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            file,
            opened: (meta.len(), meta.modified().ok()),
            region,
            mmap,
            header,
            arrival: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Current size of the file on disk (fstat, not the size at open).
    fn current_len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&e, &self.path, "stat shard"))
    }

    /// Current size and modification time (fstat).
    fn current(&self) -> Result<(u64, Option<SystemTime>)> {
        self.file
            .metadata()
            .map(|m| (m.len(), m.modified().ok()))
            .map_err(|e| Error::io(&e, &self.path, "stat shard"))
    }
}

/// Where one tensor lives: absolute byte range `[start, end)` in shard `shard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub shard: usize,
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn nbytes(&self) -> u64 {
        self.end - self.start
    }
}

/// A tensor's bytes in its shard's mapping. Cloning is cheap; the mapping
/// stays alive as long as any `View` of it does.
#[derive(Debug, Clone)]
pub struct View {
    info: Arc<TensorInfo>,
    shard: Arc<Shard>,
}

/// Whether `MADV_POPULATE_READ` (Linux 5.14+) was refused once.
static NO_POPULATE: AtomicBool = AtomicBool::new(false);

impl View {
    pub fn info(&self) -> &TensorInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.shard.path
    }

    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensor's bytes. Validated at open: `start <= end <= mapping length`.
    pub fn bytes(&self) -> &[u8] {
        let (start, end) = (self.info.start as usize, self.info.end as usize);
        self.shard.mmap.get(start..end).unwrap_or(&[])
    }

    /// Two views of the same bytes of the same mapping.
    pub fn same_bytes(&self, other: &View) -> bool {
        Arc::ptr_eq(&self.shard, &other.shard) && self.info == other.info
    }

    /// Whether `[offset, offset + len)` of this tensor (relative, clamped) is
    /// in the file: always, unless the shard is still being downloaded.
    pub fn arrived(&self, offset: u64, len: u64) -> bool {
        let Some(arrival) = &self.shard.arrival else {
            return true;
        };
        let (start, end) = self.span(offset, len);
        arrival.covers(start, end)
    }

    /// `[offset, offset + len)` of this tensor (relative, clamped to it) as absolute
    /// file offsets `(start, end)`, possibly empty.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let nbytes = self.info.nbytes();
        let start = self.info.start + offset.min(nbytes);
        let end = self.info.start + offset.saturating_add(len).min(nbytes);
        (start, end)
    }

    /// Wait until `[offset, offset + len)` of this tensor (relative, clamped)
    /// has been downloaded: `Ok(true)`, or `Ok(false)` if `timeout` passed
    /// first. Fails with [`ErrorKind::Download`], naming the file and the
    /// tensor, once the download failed. Immediate for a file on disk.
    pub fn wait_arrived(
        &self,
        offset: u64,
        len: u64,
        timeout: Option<std::time::Duration>,
    ) -> Result<bool> {
        let Some(arrival) = &self.shard.arrival else {
            return Ok(true);
        };
        let (start, end) = self.span(offset, len);
        arrival.wait(start, end, timeout).map_err(|message| {
            Error::new(
                ErrorKind::Download,
                format!("the download of this file failed: {message}"),
            )
            .for_tensor(&self.info.name)
            .in_file(&self.shard.path)
        })
    }

    /// Fail with [`ErrorKind::Truncated`] (instead of a later SIGBUS) if the
    /// file shrank below this tensor's end since it was opened, or was
    /// modified (its mtime changed: rewritten in place, e.g. by a save into
    /// the same folder).
    pub fn check_available(&self) -> Result<()> {
        crate::fault::ensure_installed();
        let (len, modified) = self.shard.current()?;
        if len < self.info.end {
            return Err(self.truncated(format!(
                "the file shrank to {len} bytes after it was opened, but the tensor \
                 occupies bytes [{}, {}): was the checkpoint overwritten while in use?",
                self.info.start, self.info.end
            )));
        }
        let (opened_len, opened_modified) = self.shard.opened;
        // A file being downloaded is written while mapped: its size was set
        // before it was opened, its modification time changes with each write.
        if modified != opened_modified && self.shard.arrival.is_none() {
            return Err(self.truncated(format!(
                "the file was modified after it was opened (size {opened_len} -> {len} \
                 bytes, new modification time): was the checkpoint overwritten while in use?"
            )));
        }
        Ok(())
    }

    /// Check, after the bytes were used, that they were the file's: fail with
    /// [`ErrorKind::Truncated`] if the file shrank under this tensor while it
    /// was mapped (the lost pages were read as zeros, see [`crate::fault`]),
    /// or if [`View::check_available`] fails now.
    pub fn check(&self) -> Result<()> {
        if let Some(lost) = self.shard.region.lost_from() {
            if lost < self.info.end {
                let len = self.shard.current_len().unwrap_or(0);
                return Err(self.truncated(format!(
                    "the file was truncated (to {len} bytes) while the tensor was read: \
                     its bytes from offset {} of [{}, {}) were gone and read as zeros; \
                     was the checkpoint overwritten while in use?",
                    lost.max(self.info.start),
                    self.info.start,
                    self.info.end
                )));
            }
        }
        self.check_available()
    }

    fn truncated(&self, message: String) -> Error {
        Error::new(ErrorKind::Truncated, message)
            .for_tensor(&self.info.name)
            .in_file(&self.shard.path)
    }

    /// Copy `dst.len()` bytes of this tensor, from `offset` (relative), into
    /// `dst` with `pread` (not through the mapping: the pages never enter the
    /// process's resident set, and a file cut short gives a short read, not
    /// SIGBUS). Fails with [`ErrorKind::Truncated`] if the file ends first or
    /// changed since it was opened (checked after the read), with
    /// [`ErrorKind::Io`] on a read error; both name the file and the tensor.
    pub fn read_into(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let len = dst.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.info.nbytes())
        {
            return Err(Error::internal("read past the end of a tensor"));
        }
        let at = self.info.start + offset;
        self.wait_arrived(offset, len, None)?;
        match self.shard.file.read_exact_at(dst, at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let now = self.shard.current_len().unwrap_or(0);
                return Err(self.truncated(format!(
                    "the file ended (at {now} bytes) before bytes [{at}, {}) of the tensor's \
                     [{}, {}) could be read: was the checkpoint overwritten while in use?",
                    at + len,
                    self.info.start,
                    self.info.end
                )));
            }
            Err(e) => {
                return Err(
                    Error::io(&e, &self.shard.path, "read shard").for_tensor(&self.info.name)
                )
            }
        }
        self.check_available()
    }

    /// Fault in the pages of `[offset, offset + len)` of this tensor (relative
    /// offsets), without copying: `MADV_POPULATE_READ`, or on kernels without
    /// it `MADV_WILLNEED` plus one read per page. Advisory: errors are ignored.
    pub fn prefetch(&self, offset: u64, len: u64) {
        let Some((start, len)) = self.absolute(offset, len) else {
            return;
        };
        let mmap = &self.shard.mmap;
        if !NO_POPULATE.load(Ordering::Relaxed) {
            match mmap.advise_range(Advice::PopulateRead, start, len) {
                Ok(()) => return,
                // Old kernel: fall back below. Other errors (EFAULT on a file
                // that shrank): give up, the consumer's fstat check reports it.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    NO_POPULATE.store(true, Ordering::Relaxed);
                }
                Err(_) => return,
            }
        }
        let _ = mmap.advise_range(Advice::WillNeed, start, len);
        // Touching a page past the end of a shrunk file would SIGBUS.
        match self.shard.current_len() {
            Ok(file_len) if file_len >= (start + len) as u64 => {}
            _ => return,
        }
        let page = page_size();
        let bytes = &mmap[start..start + len];
        let mut at = 0;
        while at < bytes.len() {
            // SAFETY: `at` is in bounds; a volatile read keeps the otherwise
            // unused load (the page fault is the point).
            unsafe { std::ptr::read_volatile(bytes.as_ptr().add(at)) };
            at += page - (bytes.as_ptr() as usize + at) % page;
        }
    }

    /// Whether every page of `[offset, offset + len)` (relative) is in the page
    /// cache (`mincore` on the mapping: nothing is read or faulted in). False
    /// when unknown.
    pub fn cached(&self, offset: u64, len: u64) -> bool {
        let Some((start, len)) = self.absolute(offset, len) else {
            return true;
        };
        let page = page_size();
        let base = self.shard.mmap.as_ptr() as usize;
        let first = (base + start) / page * page;
        let end = base + start + len;
        let pages = (end - first).div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: `[first, end)` lies within the mapping (rounded down to its
        // page-aligned start, which `mmap` returned aligned); `vec` has one
        // byte per page. mincore only reads the page tables.
        let rc =
            unsafe { libc::mincore(first as *mut libc::c_void, end - first, vec.as_mut_ptr()) };
        rc == 0 && vec.iter().all(|&b| b & 1 == 1)
    }

    /// Drop this tensor's pages from the process's resident set
    /// (`MADV_DONTNEED` on the page-aligned range around it).
    pub fn release(&self) {
        self.release_range(0, self.info.nbytes());
    }

    /// Drop `[offset, offset + len)` (relative) from the resident set.
    pub fn release_range(&self, offset: u64, len: u64) {
        let Some((start, len)) = self.absolute(offset, len) else {
            return;
        };
        // SAFETY: the mapping is a read-only MAP_SHARED file mapping, so
        // MADV_DONTNEED only unmaps pages: the next access faults them in
        // again from the page cache with the same contents. No reference into
        // the range is invalidated (unlike MADV_DONTNEED on private memory).
        let _ = unsafe {
            self.shard
                .mmap
                .unchecked_advise_range(UncheckedAdvice::DontNeed, start, len)
        };
    }

    /// `[offset, offset + len)` relative to the tensor, clamped to it, as
    /// (absolute start, len); `None` when empty.
    fn absolute(&self, offset: u64, len: u64) -> Option<(usize, usize)> {
        let nbytes = self.info.nbytes();
        let offset = offset.min(nbytes);
        let len = len.min(nbytes - offset);
        if len == 0 {
            return None;
        }
        let start = usize::try_from(self.info.start + offset).ok()?;
        let len = usize::try_from(len).ok()?;
        Some((start, len))
    }
}

/// A whole checkpoint: its shards and an index from tensor name to location.
#[derive(Debug)]
pub struct Checkpoint {
    shards: Vec<Arc<Shard>>,
    tensors: BTreeMap<String, Arc<TensorInfo>>,
    metadata: Vec<(String, String)>,
    index_metadata: Option<serde_json::Value>,
}

impl Checkpoint {
    /// Open a folder, a `.safetensors` file or an `*.index.json` file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let path = absolute(path)?;
        let meta = std::fs::metadata(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(ErrorKind::FileNotFound, "no such file or folder").in_file(&path)
            } else {
                Error::io(&e, &path, "stat checkpoint")
            }
        })?;
        if meta.is_dir() {
            return Self::open_folder(&path);
        }
        let is_json = path.extension().is_some_and(|ext| ext == "json");
        if is_json {
            Self::open_index(&path)
        } else {
            Self::open_files(&[path])
        }
    }

    /// `model.safetensors.index.json`; else the one `*.safetensors.index.json`
    /// (diffusers' `diffusion_pytorch_model.safetensors.index.json`); else
    /// `model.safetensors`; else every `*.safetensors` file, provided they are
    /// all one variant (see [`variant_of`]).
    fn open_folder(dir: &Path) -> Result<Checkpoint> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index);
        }
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(&e, dir, "list folder"))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&e, dir, "list folder"))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        let indexes: Vec<&String> = names
            .iter()
            .filter(|n| n.len() > INDEX_SUFFIX.len() && n.ends_with(INDEX_SUFFIX))
            .filter(|n| dir.join(n).is_file())
            .collect();
        if let [index] = indexes.as_slice() {
            return Self::open_index(&dir.join(index));
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        if indexes.len() > 1 {
            let shown: Vec<&str> = indexes.iter().map(|n| n.as_str()).collect();
            return Err(Error::new(
                ErrorKind::Ambiguous,
                format!(
                    "several indexes ({}) and no {INDEX_FILE} or {SINGLE_FILE}: open one \
                     index explicitly",
                    shown.join(", ")
                ),
            )
            .in_file(dir));
        }
        let shards: Vec<&String> = names
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .filter(|n| dir.join(n).is_file())
            .collect();
        if shards.is_empty() {
            let shown = if names.is_empty() {
                "it is empty".to_owned()
            } else {
                let mut shown = names
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if names.len() > 20 {
                    shown.push_str(&format!(", ... ({} files)", names.len()));
                }
                format!("it contains: {shown}")
            };
            return Err(Error::new(
                ErrorKind::FileNotFound,
                format!(
                    "no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors file in this folder ({shown})"
                ),
            )
            .in_file(dir));
        }
        let mut variants: BTreeMap<Option<&str>, Vec<&str>> = BTreeMap::new();
        for name in &shards {
            variants.entry(variant_of(name)).or_default().push(name);
        }
        if variants.len() > 1 {
            let shown: Vec<String> = variants
                .iter()
                .map(|(variant, files)| {
                    let label = variant.map_or("no variant".to_owned(), |v| format!("'{v}'"));
                    let more = if files.len() > 3 {
                        format!(", ... ({} files)", files.len())
                    } else {
                        String::new()
                    };
                    format!("{label}: {}{more}", files[..files.len().min(3)].join(", "))
                })
                .collect();
            return Err(Error::new(
                ErrorKind::Ambiguous,
                format!(
                    "the *.safetensors files are several variants of the weights ({}): open \
                     one index, file or list of shards explicitly",
                    shown.join("; ")
                ),
            )
            .in_file(dir));
        }
        let paths: Vec<PathBuf> = shards.iter().map(|n| dir.join(n)).collect();
        Self::open_files(&paths)
    }

    /// Open the given shard files, in this order.
    pub fn open_files(paths: &[PathBuf]) -> Result<Checkpoint> {
        if paths.is_empty() {
            return Err(Error::new(
                ErrorKind::FileNotFound,
                "no shard files given (an empty list)",
            ));
        }
        let mut shards = Vec::with_capacity(paths.len());
        for path in paths {
            let path = absolute(path)?;
            if !path.exists() {
                return Err(
                    Error::new(ErrorKind::FileNotFound, "no such shard file").in_file(&path)
                );
            }
            shards.push(Arc::new(Shard::open(&path)?));
        }
        Self::from_shards(shards, None)
    }

    /// Open `model.safetensors.index.json` (or any `*.index.json`) and check
    /// that it agrees with its shards, both ways.
    pub fn open_index(index: &Path) -> Result<Checkpoint> {
        let index = absolute(index)?;
        let mismatch = |msg: String| Error::new(ErrorKind::IndexMismatch, msg).in_file(&index);
        let (file, _) = open_regular(&index, "index file")?;
        let mut text = String::new();
        file.take(MAX_INDEX_SIZE + 1)
            .read_to_string(&mut text)
            .map_err(|e| mismatch(format!("cannot read the index as UTF-8 text: {e}")))?;
        if text.len() as u64 > MAX_INDEX_SIZE {
            return Err(mismatch(format!(
                "index is larger than {MAX_INDEX_SIZE} bytes"
            )));
        }
        let json = header::parse_json(&text).map_err(|e| {
            mismatch(format!(
                "index is not valid JSON: {}",
                header::json_error(&e)
            ))
        })?;
        let Json::Object(top) = json else {
            return Err(mismatch(format!(
                "index is a JSON {}, not an object with a weight_map",
                json.kind()
            )));
        };
        let mut weight_map = None;
        let mut index_metadata = None;
        let mut seen = BTreeSet::new();
        for (key, value) in top {
            if !seen.insert(key.clone()) {
                // Only the keys leanstream reads are named: the file may be
                // any JSON (a link to some other file), its keys not ours to show.
                let which = match key.as_str() {
                    "weight_map" | "metadata" => format!("key '{key}'"),
                    _ => "a key".to_owned(),
                };
                return Err(mismatch(format!(
                    "{which} appears twice in the index (duplicate JSON key)"
                )));
            }
            match key.as_str() {
                "weight_map" => weight_map = Some(value),
                "metadata" => {
                    if !matches!(value, Json::Object(_)) {
                        return Err(mismatch(format!(
                            "metadata is a JSON {}, not an object",
                            value.kind()
                        )));
                    }
                    index_metadata = Some(value.into_value().map_err(|k| {
                        mismatch(format!("metadata has key '{k}' twice (duplicate JSON key)"))
                    })?)
                }
                _ => {}
            }
        }
        let Some(Json::Object(entries)) = weight_map else {
            return Err(mismatch(
                "index has no weight_map object (tensor name -> shard file)".to_owned(),
            ));
        };
        // tensor -> shard file name, normalized (see `shard_name`).
        let mut listed: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in entries {
            let Json::String(file) = value else {
                return Err(mismatch(format!(
                    "weight_map value is a JSON {}, not a shard file name",
                    value.kind()
                ))
                .for_tensor(&name));
            };
            if listed.contains_key(&name) {
                return Err(mismatch(
                    "appears twice in weight_map (duplicate JSON key)".to_owned(),
                )
                .for_tensor(&name));
            }
            let Some(file) = shard_name(&file) else {
                return Err(mismatch(format!(
                    "weight_map names the shard {file:?}, which is not a file name inside \
                     the checkpoint folder (absolute, with '..', or naming a folder)"
                ))
                .for_tensor(&name));
            };
            listed.insert(name, file);
        }
        if listed.is_empty() {
            return Err(mismatch(
                "weight_map is empty: the index names no shard".to_owned(),
            ));
        }
        let dir = index.parent().unwrap_or(Path::new("/"));
        let files: BTreeSet<&str> = listed.values().map(String::as_str).collect();
        let mut shards = Vec::with_capacity(files.len());
        for file in &files {
            let path = dir.join(file);
            if !path.exists() {
                let users: Vec<&str> = listed
                    .iter()
                    .filter(|(_, f)| f == file)
                    .map(|(n, _)| n.as_str())
                    .collect();
                return Err(Error::new(
                    ErrorKind::FileNotFound,
                    format!(
                        "missing: {} names this shard for {} tensor(s), but it does not exist \
                         (incomplete download?)",
                        file_name(&index),
                        users.len()
                    ),
                )
                .for_tensor(users.first().copied().unwrap_or_default())
                .in_file(&path));
            }
            shards.push(Arc::new(Shard::open(&path)?));
        }
        let ckpt = Self::from_shards(shards, index_metadata)?;

        // Both directions: every listed tensor is in the named shard, and
        // every shard tensor is listed.
        for (name, file) in &listed {
            let expected = dir.join(file);
            match ckpt.tensors.get(name) {
                Some(info) if ckpt.shards[info.shard].path == expected => {}
                Some(info) => {
                    return Err(mismatch(format!(
                        "weight_map puts it in {file}, but it is in {}",
                        file_name(&ckpt.shards[info.shard].path)
                    ))
                    .for_tensor(name))
                }
                None => {
                    return Err(mismatch(format!(
                        "weight_map puts it in {file}, but {file} has no such tensor"
                    ))
                    .for_tensor(name))
                }
            }
        }
        if let Some((name, info)) = ckpt.tensors.iter().find(|(n, _)| !listed.contains_key(*n)) {
            return Err(mismatch(format!(
                "it is in {}, but weight_map does not list it",
                file_name(&ckpt.shards[info.shard].path)
            ))
            .for_tensor(name));
        }
        Ok(ckpt)
    }

    fn from_shards(
        shards: Vec<Arc<Shard>>,
        index_metadata: Option<serde_json::Value>,
    ) -> Result<Checkpoint> {
        let mut tensors: BTreeMap<String, Arc<TensorInfo>> = BTreeMap::new();
        let mut metadata: Vec<(String, String)> = Vec::new();
        for (i, shard) in shards.iter().enumerate() {
            let header = &shard.header;
            for t in &header.tensors {
                if let Some(first) = tensors.get(&t.name) {
                    return Err(Error::new(
                        ErrorKind::DuplicateTensor,
                        format!(
                            "also in {}: a tensor name may appear in one shard only",
                            shards[first.shard].path.display()
                        ),
                    )
                    .for_tensor(&t.name)
                    .in_file(&shard.path));
                }
                let info = TensorInfo {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    shard: i,
                    start: header.data_start + t.begin,
                    end: header.data_start + t.end,
                };
                tensors.insert(t.name.clone(), Arc::new(info));
            }
            for (k, v) in &header.metadata {
                if !metadata.iter().any(|(key, _)| key == k) {
                    metadata.push((k.clone(), v.clone()));
                }
            }
        }
        Ok(Checkpoint {
            shards,
            tensors,
            metadata,
            index_metadata,
        })
    }

    /// Absolute shard paths, in the order they were opened.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// Union of the shards' `__metadata__` (the first shard wins on conflicts).
    pub fn metadata(&self) -> &[(String, String)] {
        &self.metadata
    }

    /// The index's `metadata` object, if there was an index with one.
    pub fn index_metadata(&self) -> Option<&serde_json::Value> {
        self.index_metadata.as_ref()
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(Arc::as_ref)
    }

    /// Mark shards as still being downloaded: each `(path, arrival)` names a
    /// shard of this checkpoint by its path (as opened) and says which of its
    /// bytes have arrived; views of it wait for their bytes
    /// ([`View::wait_arrived`]). Call before any view is taken. A path that is
    /// not a shard, or an arrival whose length is not the file's, is an error.
    pub fn attach_arrivals(&mut self, arrivals: Vec<(PathBuf, Arc<Arrival>)>) -> Result<()> {
        for (path, arrival) in arrivals {
            let path = absolute(&path)?;
            let Some(shard) = self.shards.iter_mut().find(|s| s.path == path) else {
                return Err(Error::new(
                    ErrorKind::FileNotFound,
                    "given as being downloaded, but not a shard of this checkpoint",
                )
                .in_file(&path));
            };
            if arrival.len() != shard.opened.0 {
                return Err(Error::new(
                    ErrorKind::Truncated,
                    format!(
                        "being downloaded as {} bytes, but the file holds {}",
                        arrival.len(),
                        shard.opened.0
                    ),
                )
                .in_file(&path));
            }
            let Some(shard) = Arc::get_mut(shard) else {
                return Err(Error::internal("arrivals attached after views were taken"));
            };
            shard.arrival = Some(arrival);
        }
        Ok(())
    }

    pub fn shard_path(&self, info: &TensorInfo) -> &Path {
        self.shards
            .get(info.shard)
            .map_or(Path::new(""), |s| s.path.as_path())
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.nbytes()).sum()
    }

    /// A view of one tensor (no fstat check: see [`View::check_available`]).
    pub fn view(&self, name: &str) -> Result<View> {
        let info = self.tensors.get(name).ok_or_else(|| self.missing(name))?;
        let shard = self
            .shards
            .get(info.shard)
            .ok_or_else(|| Error::internal("tensor points to no shard"))?;
        Ok(View {
            info: Arc::clone(info),
            shard: Arc::clone(shard),
        })
    }

    /// Views of all `names`, or [`ErrorKind::MissingTensor`] for the first unknown one.
    pub fn views<S: AsRef<str>>(&self, names: &[S]) -> Result<Vec<View>> {
        names.iter().map(|n| self.view(n.as_ref())).collect()
    }

    /// The [`ErrorKind::MissingTensor`] error for `name`.
    pub fn missing(&self, name: &str) -> Error {
        Error::new(
            ErrorKind::MissingTensor,
            format!(
                "not in the checkpoint ({} tensors in {} shard(s))",
                self.tensors.len(),
                self.shards.len()
            ),
        )
        .for_tensor(name)
    }
}

/// The variant of a `*.safetensors` file name, named as transformers and
/// diffusers name them (`_add_variant`): `None` for `model.safetensors` and
/// `model-00001-of-00002.safetensors`, `Some("fp16")` for
/// `model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors` and the
/// older `model-00001-of-00002.fp16.safetensors`.
pub fn variant_of(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".safetensors").unwrap_or(name);
    let stem = strip_shard_suffix(stem);
    match stem.rsplit_once('.') {
        Some((prefix, variant)) if !prefix.is_empty() && !variant.is_empty() => Some(variant),
        _ => None,
    }
}

/// `stem` without a trailing `-<digits>-of-<digits>`.
fn strip_shard_suffix(stem: &str) -> &str {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some((head, total)) = stem.rsplit_once("-of-") {
        if digits(total) {
            if let Some((prefix, number)) = head.rsplit_once('-') {
                if digits(number) {
                    return prefix;
                }
            }
        }
    }
    stem
}

/// The shard file an index's weight_map names, as a path relative to the
/// index's folder with its harmless spellings made one: `./x`, `././x`, `a/./x`
/// and `a//x` are `x` and `a/x` (transformers joins the name to the folder as
/// written, so it loads them; two spellings of one file are one shard, opened
/// once). `None` for a name that is not a file inside the folder: empty,
/// absolute, with a `..` segment (even one that would come back in), or
/// ending in `/` or `/.` (a folder). A backslash is part of a file name, as on
/// any Unix.
fn shard_name(written: &str) -> Option<String> {
    if written.starts_with('/') || written.ends_with('/') || written.ends_with("/.") {
        return None;
    }
    let mut parts = Vec::new();
    for part in written.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io(&e, path, "resolve path"))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::header::tests::shard;
    use std::io::Write;

    /// A one-shard checkpoint of U8 tensors `t0, t1, ...` of the given sizes,
    /// byte `j` of tensor `i` being `byte(i, j)`.
    pub fn checkpoint_of(
        sizes: &[usize],
        byte: impl Fn(usize, usize) -> u8,
    ) -> (tempfile::TempDir, Checkpoint) {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<(String, Vec<u8>)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("t{i}"), (0..n).map(|j| byte(i, j)).collect()))
            .collect();
        let tensors: Vec<(&str, &[u8])> = data
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        let path = dir.path().join("m.safetensors");
        write_shard(&path, &tensors);
        let ckpt = Checkpoint::open(&path).unwrap();
        (dir, ckpt)
    }

    /// Write a shard of U8 tensors `(name, bytes)` laid out contiguously.
    pub fn write_shard(path: &Path, tensors: &[(&str, &[u8])]) {
        let mut entries = Vec::new();
        let mut data = Vec::new();
        for (name, bytes) in tensors {
            entries.push(format!(
                r#""{name}":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}}"#,
                bytes.len(),
                data.len(),
                data.len() + bytes.len()
            ));
            data.extend_from_slice(bytes);
        }
        let header = format!(
            r#"{{"__metadata__":{{"format":"pt"}},{}}}"#,
            entries.join(",")
        );
        std::fs::write(path, shard(&header, &data)).unwrap();
    }

    /// How long a test waits for something that must happen before it calls
    /// it a hang: a safety net, never what a test measures (a slow or loaded
    /// machine takes milliseconds where this allows a minute).
    pub const HANG: std::time::Duration = std::time::Duration::from_secs(60);

    /// Wait (polling) until `done()`; fail after [`HANG`].
    pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + HANG;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "hung: {what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// `f()` run in another thread: its result, or a failure after [`HANG`]
    /// (where `f` would block forever, the test fails instead of hanging).
    pub fn finishes<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(HANG)
            .unwrap_or_else(|_| panic!("hung: {what}"))
    }

    /// Truncate `path` to `len` bytes, keeping its modification time (so that
    /// only the size can tell).
    pub fn shrink(path: &Path, len: u64) {
        let f = File::options().write(true).open(path).unwrap();
        let modified = f.metadata().unwrap().modified().unwrap();
        f.set_len(len).unwrap();
        f.set_modified(modified).unwrap();
    }

    /// Write a shard of U8 tensors `(name, len)` laid out contiguously whose
    /// data section is a hole (the file is extended with `set_len` past the
    /// header): all zeros, and no byte of it was ever written or read, so none
    /// of it can be in the page cache until something reads it.
    pub fn write_sparse_shard(path: &Path, tensors: &[(&str, u64)]) {
        let mut entries = Vec::new();
        let mut end = 0;
        for (name, len) in tensors {
            entries.push(format!(
                r#""{name}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{end},{}]}}"#,
                end + len
            ));
            end += len;
        }
        let head = shard(&format!("{{{}}}", entries.join(",")), &[]);
        let mut f = File::create(path).unwrap();
        f.write_all(&head).unwrap();
        f.set_len(head.len() as u64 + end).unwrap();
    }

    /// Room around the tensors of [`write_sparse_shard`] files that tests need
    /// never read: more than the kernel reads around a page fault (at most
    /// `read_ahead_kb`, 8 MiB on some virtual disks, on either side) or ahead
    /// of a read.
    pub const PAD: u64 = 32 << 20;

    fn write_index(dir: &Path, map: &[(&str, &str)]) {
        write_index_named(dir, INDEX_FILE, map);
    }

    fn write_index_named(dir: &Path, name: &str, map: &[(&str, &str)]) {
        let entries: Vec<String> = map.iter().map(|(n, f)| format!(r#""{n}":"{f}""#)).collect();
        let text = format!(
            r#"{{"metadata":{{"total_size":8}},"weight_map":{{{}}}}}"#,
            entries.join(",")
        );
        let mut f = File::create(dir.join(name)).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn opened(ckpt: &Checkpoint) -> Vec<String> {
        ckpt.files().map(file_name).collect()
    }

    #[test]
    fn variant_names() {
        for (name, variant) in [
            ("model.safetensors", None),
            ("model-00001-of-00002.safetensors", None),
            ("diffusion_pytorch_model.safetensors", None),
            ("model.fp16.safetensors", Some("fp16")),
            ("model.fp16-00001-of-00002.safetensors", Some("fp16")),
            ("model-00001-of-00002.fp16.safetensors", Some("fp16")),
            (
                "diffusion_pytorch_model.non_ema.safetensors",
                Some("non_ema"),
            ),
            ("model-1-of-x.safetensors", None),
            ("model.v-1-of-x.safetensors", Some("v-1-of-x")),
            (".safetensors", None),
            (".fp16.safetensors", None),
            ("model..safetensors", None),
        ] {
            assert_eq!(variant_of(name), variant, "{name}");
        }
    }

    #[test]
    fn opens_a_lone_diffusers_index() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, s2) = (
            "diffusion_pytorch_model-00001-of-00002.safetensors",
            "diffusion_pytorch_model-00002-of-00002.safetensors",
        );
        write_shard(&dir.path().join(s1), &[("a", b"a")]);
        write_shard(&dir.path().join(s2), &[("b", b"b")]);
        write_index_named(
            dir.path(),
            "diffusion_pytorch_model.safetensors.index.json",
            &[("a", s1), ("b", s2)],
        );
        // Its fp16 variant beside it is not an index of the weights without a variant.
        let f1 = "diffusion_pytorch_model.fp16-00001-of-00001.safetensors";
        write_shard(&dir.path().join(f1), &[("a", b"A"), ("b", b"B")]);
        write_index_named(
            dir.path(),
            "diffusion_pytorch_model.safetensors.index.fp16.json",
            &[("a", f1), ("b", f1)],
        );
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(opened(&ckpt), [s1, s2]);
        assert_eq!(ckpt.view("b").unwrap().bytes(), b"b");
    }

    #[test]
    fn variants_side_by_side_are_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        let main = "diffusion_pytorch_model.safetensors";
        let fp16 = "diffusion_pytorch_model.fp16.safetensors";
        write_shard(&dir.path().join(main), &[("w", b"ww")]);
        write_shard(&dir.path().join(fp16), &[("w", b"w")]);
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Ambiguous, "{e}");
        assert_eq!(e.file.as_deref(), Some(dir.path()));
        assert!(
            e.message.contains(&format!("no variant: {main}"))
                && e.message.contains(&format!("'fp16': {fp16}"))
                && e.message.contains("explicitly"),
            "{e}"
        );
        // Sharded variants: three shards at most are named per variant.
        for i in 1..=5 {
            let name = format!("diffusion_pytorch_model.bf16-0000{i}-of-00005.safetensors");
            write_shard(&dir.path().join(name), &[(&format!("w{i}"), b"w")]);
        }
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Ambiguous, "{e}");
        assert!(
            e.message
                .contains("'bf16': diffusion_pytorch_model.bf16-00001-of-00005")
                && e.message.contains("... (5 files)")
                && !e.message.contains("00004-of"),
            "{e}"
        );
        // Opening one of them explicitly works.
        assert_eq!(
            Checkpoint::open(&dir.path().join(fp16))
                .unwrap()
                .view("w")
                .unwrap()
                .bytes(),
            b"w"
        );
    }

    #[test]
    fn one_variant_alone_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, s2) = (
            "model.fp16-00001-of-00002.safetensors",
            "model.fp16-00002-of-00002.safetensors",
        );
        write_shard(&dir.path().join(s2), &[("b", b"b")]);
        write_shard(&dir.path().join(s1), &[("a", b"a")]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(opened(&ckpt), [s1, s2]);
        // model.safetensors comes first, variants or not.
        write_shard(&dir.path().join(SINGLE_FILE), &[("m", b"m")]);
        write_shard(&dir.path().join("model.fp16.safetensors"), &[("m", b"M")]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(opened(&ckpt), [SINGLE_FILE]);
    }

    #[test]
    fn several_indexes_are_ambiguous_without_model_files() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("s1.safetensors"), &[("a", b"a")]);
        write_shard(&dir.path().join("s2.safetensors"), &[("a", b"b")]);
        write_index_named(
            dir.path(),
            "x.safetensors.index.json",
            &[("a", "s1.safetensors")],
        );
        write_index_named(
            dir.path(),
            "y.safetensors.index.json",
            &[("a", "s2.safetensors")],
        );
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Ambiguous, "{e}");
        assert!(
            e.message
                .contains("several indexes (x.safetensors.index.json, y.safetensors.index.json)"),
            "{e}"
        );
        write_shard(&dir.path().join(SINGLE_FILE), &[("m", b"m")]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(opened(&ckpt), [SINGLE_FILE]);
        write_index(dir.path(), &[("a", "s2.safetensors")]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.view("a").unwrap().bytes(), b"b");
        // A lone index names what is opened, ahead of model.safetensors.
        std::fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
        std::fs::remove_file(dir.path().join("y.safetensors.index.json")).unwrap();
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(opened(&ckpt), ["s1.safetensors"]);
    }

    #[test]
    fn opens_folder_with_index() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(
            &dir.path().join("s1.safetensors"),
            &[("a", b"aa"), ("b", b"b")],
        );
        write_shard(&dir.path().join("s2.safetensors"), &[("c", b"ccc")]);
        write_index(
            dir.path(),
            &[
                ("a", "s1.safetensors"),
                ("b", "s1.safetensors"),
                ("c", "s2.safetensors"),
            ],
        );
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(ckpt.files().count(), 2);
        assert_eq!(ckpt.view("c").unwrap().bytes(), b"ccc");
        assert_eq!(ckpt.view("a").unwrap().bytes(), b"aa");
        assert_eq!(ckpt.total_bytes(), 6);
        assert_eq!(ckpt.metadata(), [("format".to_owned(), "pt".to_owned())]);
        assert_eq!(ckpt.index_metadata().unwrap()["total_size"], 8);
        let e = ckpt.view("zz").unwrap_err();
        assert_eq!(e.kind, ErrorKind::MissingTensor);
    }

    #[test]
    fn folder_fallbacks() {
        let dir = tempfile::tempdir().unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FileNotFound);
        assert!(e.message.contains("empty"), "{e}");
        std::fs::write(dir.path().join("README.md"), "hi").unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(e.message.contains("README.md"), "{e}");
        write_shard(&dir.path().join("b.safetensors"), &[("y", b"y")]);
        write_shard(&dir.path().join("a.safetensors"), &[("x", b"x")]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let files: Vec<_> = ckpt.files().map(file_name).collect();
        assert_eq!(files, ["a.safetensors", "b.safetensors"]);
        write_shard(&dir.path().join(SINGLE_FILE), &[("m", b"m")]);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ckpt.names().collect::<Vec<_>>(), ["m"]);
        let e = Checkpoint::open(&dir.path().join("nope")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FileNotFound);
    }

    #[test]
    fn index_mismatches() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("s1.safetensors"), &[("a", b"a")]);
        write_shard(&dir.path().join("s2.safetensors"), &[("b", b"b")]);

        write_index(
            dir.path(),
            &[("a", "s1.safetensors"), ("b", "s3.safetensors")],
        );
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::FileNotFound);
        assert_eq!(e.tensor.as_deref(), Some("b"));

        write_index(
            dir.path(),
            &[
                ("a", "s1.safetensors"),
                ("b", "s1.safetensors"),
                ("x", "s2.safetensors"),
            ],
        );
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::IndexMismatch);
        assert_eq!(e.tensor.as_deref(), Some("b"));
        assert!(
            e.message.contains("s1.safetensors") && e.message.contains("s2.safetensors"),
            "{e}"
        );

        // A shard tensor the index does not list.
        write_shard(
            &dir.path().join("s3.safetensors"),
            &[("p", b"p"), ("q", b"q")],
        );
        write_index(
            dir.path(),
            &[("a", "s1.safetensors"), ("p", "s3.safetensors")],
        );
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::IndexMismatch);
        assert_eq!(e.tensor.as_deref(), Some("q"));
        assert!(e.message.contains("does not list"), "{e}");

        write_index(
            dir.path(),
            &[
                ("a", "s1.safetensors"),
                ("b", "s2.safetensors"),
                ("c", "s2.safetensors"),
            ],
        );
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::IndexMismatch);
        assert_eq!(e.tensor.as_deref(), Some("c"));

        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"weight_map":{"a":"s1.safetensors","a":"s1.safetensors"}}"#,
        )
        .unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::IndexMismatch);
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"metadata":[],"weight_map":{}}"#,
        )
        .unwrap();
        assert_eq!(
            Checkpoint::open(dir.path()).unwrap_err().kind,
            ErrorKind::IndexMismatch
        );
        std::fs::write(dir.path().join(INDEX_FILE), r#"{"weight_map":{}}"#).unwrap();
        assert_eq!(
            Checkpoint::open(dir.path()).unwrap_err().kind,
            ErrorKind::IndexMismatch
        );
        std::fs::write(dir.path().join(INDEX_FILE), "[]").unwrap();
        assert_eq!(
            Checkpoint::open(dir.path()).unwrap_err().kind,
            ErrorKind::IndexMismatch
        );
    }

    #[test]
    fn duplicate_tensor_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        write_shard(&dir.path().join("s1.safetensors"), &[("a", b"a")]);
        write_shard(&dir.path().join("s2.safetensors"), &[("a", b"b")]);
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DuplicateTensor);
        assert_eq!(e.tensor.as_deref(), Some("a"));
        assert!(e.message.contains("s1.safetensors"), "{e}");
        assert!(e.file.unwrap().ends_with("s2.safetensors"));
    }

    #[test]
    fn header_errors_carry_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"abc").unwrap();
        let e = Checkpoint::open(&path).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Truncated);
        assert_eq!(e.file.as_deref(), Some(path.as_path()));
        std::fs::write(&path, b"").unwrap();
        assert_eq!(
            Checkpoint::open(&path).unwrap_err().kind,
            ErrorKind::Truncated
        );
    }

    #[test]
    fn shrunk_file_is_reported_not_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_shard(&path, &[("a", &[1; 10000]), ("b", &[2; 10000])]);
        let ckpt = Checkpoint::open(&path).unwrap();
        let b = ckpt.view("b").unwrap();
        b.check_available().unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        shrink(&path, len - 5000);
        assert_eq!(b.check_available().unwrap_err().kind, ErrorKind::Truncated);
        // Prefetching a shrunk file must not crash either.
        b.prefetch(0, 10000);
        assert!(ckpt.view("a").unwrap().check_available().is_ok());
    }

    #[test]
    fn truncation_while_reading_is_reported_after_use() {
        let page = page_size();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let big = vec![9u8; 8 * page];
        write_shard(&path, &[("a", &[1; 100]), ("b", &big)]);
        let ckpt = Checkpoint::open(&path).unwrap();
        let (a, b) = (ckpt.view("a").unwrap(), ckpt.view("b").unwrap());
        b.check_available().unwrap();
        b.release();
        // Cut the file in the middle of b after it was handed out: reading it
        // would SIGBUS without `fault`; it reads zeros and `check` says so.
        let len = std::fs::metadata(&path).unwrap().len();
        shrink(&path, len - 4 * page as u64);
        let sum: u64 = b.bytes().iter().map(|&x| u64::from(x)).sum();
        assert!(sum < 9 * 8 * page as u64);
        let e = b.check().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Truncated);
        assert_eq!(e.tensor.as_deref(), Some("b"));
        assert!(e.message.contains("read as zeros"), "{e}");
        // a lies below the lost pages: intact.
        assert_eq!(a.bytes(), &[1; 100]);
        a.check().unwrap();
    }

    #[test]
    fn modified_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_shard(&path, &[("a", b"aaaa")]);
        let ckpt = Checkpoint::open(&path).unwrap();
        let a = ckpt.view("a").unwrap();
        a.check().unwrap();
        let f = File::options().write(true).open(&path).unwrap();
        let later = f.metadata().unwrap().modified().unwrap() + std::time::Duration::from_secs(5);
        f.set_modified(later).unwrap();
        let e = a.check().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Truncated);
        assert!(e.message.contains("modified"), "{e}");
    }

    #[test]
    fn fifo_shard_and_index_do_not_block() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["x.safetensors", "x.index.json"] {
            let path = dir.path().join(name);
            let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
            // SAFETY: a valid C string.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = Checkpoint::open(&path).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Io);
            assert!(e.message.contains("not a regular file"), "{e}");
        }
        // Named by an index: not "missing", not a hang.
        write_index(dir.path(), &[("a", "x.safetensors")]);
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Io);
        assert!(e.file.unwrap().ends_with("x.safetensors"));
    }

    #[test]
    fn index_cannot_name_files_outside_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("ckpt");
        std::fs::create_dir(&sub).unwrap();
        write_shard(&dir.path().join("out.safetensors"), &[("a", b"a")]);
        for bad in [
            "../out.safetensors",
            "./../out.safetensors",
            "x/../../out.safetensors",
            "/etc/hostname",
            "/./etc/hostname",
            "",
            ".",
            "./",
            "out.safetensors/",
            "out.safetensors/.",
        ] {
            write_index(&sub, &[("a", bad)]);
            let e = Checkpoint::open(&sub).unwrap_err();
            assert_eq!(e.kind, ErrorKind::IndexMismatch, "{bad}: {e}");
            assert_eq!(e.tensor.as_deref(), Some("a"));
        }
    }

    /// Regression (issue 24): transformers loads an index whose weight_map
    /// writes `./model-00001-of-00002.safetensors` (it joins the name to the
    /// folder as written); such names were refused. Names that differ only by
    /// `./` segments or doubled slashes are one shard, opened once.
    #[test]
    fn index_names_with_dot_segments_are_one_shard() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        write_shard(
            &dir.path().join("s1.safetensors"),
            &[("a", b"a"), ("c", b"c")],
        );
        write_shard(&dir.path().join("s2.safetensors"), &[("b", b"b")]);
        write_shard(&dir.path().join("sub/s3.safetensors"), &[("d", b"d")]);
        write_index(
            dir.path(),
            &[
                ("a", "./s1.safetensors"),
                ("c", "s1.safetensors"),
                ("b", "././s2.safetensors"),
                ("d", ".//sub/./s3.safetensors"),
            ],
        );
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(
            opened(&ckpt),
            ["s1.safetensors", "s2.safetensors", "s3.safetensors"]
        );
        let files: Vec<&Path> = ckpt.files().collect();
        assert_eq!(files[2], dir.path().join("sub/s3.safetensors"));
        for name in ["a", "b", "c", "d"] {
            assert_eq!(ckpt.view(name).unwrap().bytes(), name.as_bytes());
        }
        // Still checked both ways, with the name normalized.
        write_index(
            dir.path(),
            &[
                ("a", "./s2.safetensors"),
                ("c", "s1.safetensors"),
                ("b", "s2.safetensors"),
                ("d", "sub/s3.safetensors"),
            ],
        );
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::IndexMismatch);
        assert_eq!(e.tensor.as_deref(), Some("a"));
        assert!(e.message.contains("puts it in s2.safetensors"), "{e}");
    }

    #[test]
    fn shard_names_are_normalized_inside_the_folder_only() {
        for (written, name) in [
            ("x.safetensors", Some("x.safetensors")),
            ("./x.safetensors", Some("x.safetensors")),
            ("a/./b//x", Some("a/b/x")),
            ("a\\x", Some("a\\x")),
            ("..x", Some("..x")),
            ("a/../x", None),
            ("..", None),
            ("/x", None),
            ("x/", None),
            ("x/.", None),
            ("", None),
        ] {
            assert_eq!(shard_name(written).as_deref(), name, "{written:?}");
        }
    }

    /// Regression (issue 24): an index that is some other JSON file (a link to
    /// a file of secrets) is refused without quoting its keys or text.
    #[test]
    fn index_errors_do_not_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            r#"{"s3cr3t_k3y": "v", "s3cr3t_k3y": "w"}"#,
            r#"{"s3cr3t_k3y": tru}"#,
            "s3cr3t_k3y=v\n",
        ] {
            std::fs::write(dir.path().join(INDEX_FILE), text).unwrap();
            let e = Checkpoint::open(dir.path()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::IndexMismatch, "{text}: {e}");
            assert!(!e.to_string().contains("s3cr3t"), "{text}: {e}");
            assert!(e.file.unwrap().ends_with(INDEX_FILE));
        }
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"weight_map": {}, "weight_map": {}}"#,
        )
        .unwrap();
        let e = Checkpoint::open(dir.path()).unwrap_err();
        assert!(e.message.contains("key 'weight_map' appears twice"), "{e}");
    }

    #[test]
    fn cached_tells_pages_never_read_from_locked_ones() {
        let mib = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        // The pads take what the kernel reads around the header parse's and
        // mlock's page faults.
        let layout = [
            ("pad0", PAD),
            ("cold", mib),
            ("pad1", PAD),
            ("locked", mib),
            ("pad2", PAD),
        ];
        write_sparse_shard(&path, &layout);
        let ckpt = Checkpoint::open(&path).unwrap();
        let (cold, locked) = (ckpt.view("cold").unwrap(), ckpt.view("locked").unwrap());
        // Never read by anyone: not cached, whatever the kernel and memory
        // pressure do.
        assert!(!cold.cached(0, mib));
        assert!(!cold.cached(mib / 2, 1));
        let bytes = locked.bytes();
        // SAFETY: a range of a live read-only mapping: mlock faults it in and
        // pins it, munlock below lets it go.
        if unsafe { libc::mlock(bytes.as_ptr().cast(), bytes.len()) } != 0 {
            // EPERM or ENOMEM without CAP_IPC_LOCK or RLIMIT_MEMLOCK room
            eprintln!(
                "mlock refused ({}): the locked half is not checked",
                std::io::Error::last_os_error()
            );
            return;
        }
        // Locked: resident until unlocked, whatever the memory pressure.
        let resident = (locked.cached(0, mib), locked.cached(mib - 1, 1));
        // SAFETY: the range locked above.
        unsafe { libc::munlock(bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(resident, (true, true));
        assert!(!cold.cached(0, mib), "read-around reached the cold tensor");
        // Empty ranges are cached (nothing to read).
        assert!(cold.cached(mib, 10));
    }

    #[test]
    fn release_keeps_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        write_shard(&path, &[("a", &big), ("e", b"")]);
        let ckpt = Checkpoint::open(&path).unwrap();
        let v = ckpt.view("a").unwrap();
        v.prefetch(0, u64::MAX);
        v.release();
        assert_eq!(v.bytes(), big.as_slice());
        let e = ckpt.view("e").unwrap();
        e.prefetch(0, 10);
        e.release();
        assert!(e.is_empty());
        assert!(v.same_bytes(&ckpt.view("a").unwrap()));
    }
}

#[cfg(test)]
mod arrival_tests {
    use super::tests::{finishes, write_shard};
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A shard of `t0` (100 bytes of 1) and `t1` (100 bytes of 2) whose tensor
    /// bytes are zeros on disk, as a download that has only written the
    /// header; returns the real bytes and where the data starts.
    fn half_downloaded() -> (tempfile::TempDir, PathBuf, Vec<u8>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_shard(&path, &[("t0", &[1; 100]), ("t1", &[2; 100])]);
        let full = std::fs::read(&path).unwrap();
        let data_start = full.len() as u64 - 200;
        let file = File::options().write(true).open(&path).unwrap();
        file.write_all_at(&[0; 200], data_start).unwrap();
        (dir, path, full, data_start)
    }

    fn open_with(path: &Path, arrival: &Arc<Arrival>) -> Checkpoint {
        let mut ckpt = Checkpoint::open(path).unwrap();
        ckpt.attach_arrivals(vec![(path.to_path_buf(), Arc::clone(arrival))])
            .unwrap();
        ckpt
    }

    #[test]
    fn reads_wait_for_the_bytes_and_see_them() {
        let (_dir, path, full, data_start) = half_downloaded();
        let arrival = Arc::new(Arrival::new(full.len() as u64));
        arrival.add(0, data_start);
        let ckpt = open_with(&path, &arrival);
        let view = ckpt.view("t1").unwrap();
        assert!(!view.arrived(0, 100));
        assert!(!view.wait_arrived(0, 100, Some(ARRIVAL_POLL)).unwrap());
        let reader = {
            let view = view.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 100];
                view.read_into(0, &mut buf).map(|()| buf)
            })
        };
        // the downloader writes the bytes, then says so; the file's mtime
        // changes, which is no "modified while in use" for such a shard
        std::thread::sleep(std::time::Duration::from_millis(20));
        let file = File::options().write(true).open(&path).unwrap();
        file.write_all_at(&full[data_start as usize..], data_start)
            .unwrap();
        arrival.add(data_start, full.len() as u64);
        let got = finishes("the read of arrived bytes", move || reader.join().unwrap());
        assert_eq!(got.unwrap(), [2; 100]);
        assert_eq!(view.bytes(), &[2; 100]);
        view.check().unwrap();
    }

    #[test]
    fn a_failed_download_is_a_download_error_naming_file_and_tensor() {
        let (_dir, path, full, data_start) = half_downloaded();
        let arrival = Arc::new(Arrival::new(full.len() as u64));
        arrival.add(0, data_start + 100);
        let ckpt = open_with(&path, &arrival);
        let view = ckpt.view("t1").unwrap();
        let reader = {
            let view = view.clone();
            std::thread::spawn(move || view.read_into(0, &mut [0u8; 100]))
        };
        arrival.fail("sha256 mismatch");
        let err = finishes("the failed read", move || reader.join().unwrap()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Download);
        assert_eq!(err.tensor.as_deref(), Some("t1"));
        assert_eq!(err.file.as_deref(), Some(path.as_path()));
        assert!(err.to_string().contains("sha256 mismatch"), "{err}");
        // even bytes that arrived: the file they belong to is not complete
        let t0 = ckpt.view("t0").unwrap();
        assert_eq!(
            t0.wait_arrived(0, 100, None).unwrap_err().kind,
            ErrorKind::Download
        );
    }

    #[test]
    fn an_arrival_must_name_a_shard_and_its_length() {
        let (_dir, path, full, _) = half_downloaded();
        let mut ckpt = Checkpoint::open(&path).unwrap();
        let wrong_len = Arc::new(Arrival::new(full.len() as u64 + 1));
        let err = ckpt
            .attach_arrivals(vec![(path.clone(), wrong_len)])
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Truncated);
        let other = path.with_file_name("other.safetensors");
        let arrival = Arc::new(Arrival::new(full.len() as u64));
        let err = ckpt.attach_arrivals(vec![(other, arrival)]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::FileNotFound);
    }
}
