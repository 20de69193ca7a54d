//! Quantizing many small tensors of a stream at once, into one output.
//!
//! A mixture-of-experts checkpoint stores thousands of small tensors (one per
//! expert and projection, a MiB or so each) that make one 3-D weight. Handed
//! to Python one at a time, each costs more in bookkeeping than in
//! quantization, and each is quantized on one thread (splitting a MiB over
//! threads costs a start and a join per tensor, and waits for the slowest
//! thread whenever another process holds a core). Here a run of such tensors
//! is taken from the stream at once and quantized by a few threads that each
//! take whole tensors in stream order, one after another (a busy core slows
//! one worker, the others take more tensors; a run of fewer tensors than
//! threads, such as one large piece, splits each over the spare threads), into
//! disjoint ranges of the
//! caller's output; each tensor's pages are released as soon as it is done,
//! so the read-ahead keeps running ahead of the workers within its window.
//!
//! The result is what quantizing each tensor into its range alone gives: 4-bit
//! blocks never straddle two tensors (each starts and ends on a block), and
//! int8 statistics are per row.

use crate::error::{Error, ErrorKind, Result};
use crate::quant::{self, QuantType};
use crate::reader::View;
use crate::stream::Slot;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// The output the tensors are quantized into, as one flattened value space:
/// value `i` is element `i` of the row-major concatenation the caller means.
#[derive(Debug)]
pub enum Outputs<'a> {
    /// Blockwise 4-bit: two values a byte in `packed`, one `absmax` a block.
    FourBit {
        packed: &'a mut [u8],
        absmax: &'a mut [f32],
        quant_type: QuantType,
        blocksize: usize,
    },
    /// LLM.int8: one int8 a value in `out`, one statistic a row of `cols`.
    Int8 {
        out: &'a mut [i8],
        scb: &'a mut [f32],
        cols: usize,
    },
}

impl Outputs<'_> {
    /// Values the output holds.
    fn values(&self) -> usize {
        match self {
            Outputs::FourBit { packed, .. } => packed.len() * 2,
            Outputs::Int8 { out, .. } => out.len(),
        }
    }

    /// Statistics for every unit of values, a valid block size.
    fn check(&self) -> Result<()> {
        let fits = match self {
            Outputs::FourBit {
                packed,
                absmax,
                blocksize,
                ..
            } => {
                if !quant::BLOCKSIZES.contains(blocksize) {
                    let e = quant::QuantError::Blocksize(*blocksize);
                    return Err(Error::new(ErrorKind::Internal, e.to_string()));
                }
                absmax.len() == quant::blocks(packed.len() * 2, *blocksize)
            }
            Outputs::Int8 { out, scb, cols } => *cols > 0 && scb.len() * cols == out.len(),
        };
        if fits {
            Ok(())
        } else {
            Err(Error::internal("quantizer outputs of mismatched lengths"))
        }
    }

    /// Values a tensor's range must start and end on (a block, a row).
    fn unit(&self) -> usize {
        match self {
            Outputs::FourBit { blocksize, .. } => *blocksize,
            Outputs::Int8 { cols, .. } => *cols,
        }
    }
}

/// One tensor's share of the output.
enum Share<'a> {
    FourBit(&'a mut [u8], &'a mut [f32], QuantType, usize),
    Int8(&'a mut [i8], &'a mut [f32], usize),
}

/// Quantize each of `items` (views taken from a stream, with their slots)
/// into the output range starting at value `firsts[i]`, on `threads` threads,
/// releasing each view's pages once it is quantized. Ranges must start and end
/// on a unit (4-bit block, int8 row), lie inside the output and not overlap:
/// otherwise nothing is written and the error names the tensor. The views'
/// bytes are awaited if their file is still downloading.
pub fn quantize_views(
    items: &[(View, Slot)],
    firsts: &[usize],
    outputs: Outputs<'_>,
    threads: usize,
) -> Result<()> {
    if items.len() != firsts.len() {
        return Err(Error::internal("one first value per tensor"));
    }
    outputs.check()?;
    let (total, unit) = (outputs.values(), outputs.unit());
    let mut ranges = Vec::with_capacity(items.len());
    for (i, ((view, _), &first)) in items.iter().zip(firsts).enumerate() {
        let n = values(view)?;
        let fits = unit > 0
            && first.is_multiple_of(unit)
            && n.is_multiple_of(unit)
            && first.checked_add(n).is_some_and(|end| end <= total);
        if !fits {
            return Err(placement(
                view,
                format!(
                    "its {n} values cannot go at value {first} of an output of {total} \
                     values in whole units of {unit}"
                ),
            ));
        }
        ranges.push((first, n, i));
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let ((a, an, ai), (b, _, bi)) = (pair[0], pair[1]);
        if a + an > b {
            let other = &items[ai.min(bi)].0.info().name;
            return Err(placement(
                &items[ai.max(bi)].0,
                format!("its output range overlaps that of tensor '{other}'"),
            ));
        }
    }
    let shares = split(outputs, &ranges, items.len());
    let jobs: Vec<Mutex<Option<Share<'_>>>> =
        shares.into_iter().map(|s| Mutex::new(Some(s))).collect();
    let workers = threads.max(1).min(items.len());
    // fewer tensors than threads (one large piece): each split over the spare threads
    let inner = (threads.max(1) / workers.max(1)).max(1);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let work = || {
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= jobs.len() {
                break;
            }
            let share = jobs[i].lock().ok().and_then(|mut job| job.take());
            let done = match share {
                Some(share) => quantize_one(&items[i], share, inner),
                None => Err(Error::internal("a tensor's share was taken twice")),
            };
            if let Err(e) = done {
                failed.store(true, Ordering::Relaxed);
                if let Ok(mut slot) = first_error.lock() {
                    slot.get_or_insert(e);
                }
            }
        }
    };
    if workers <= 1 {
        work();
    } else {
        std::thread::scope(|s| {
            for _ in 1..workers {
                s.spawn(work);
            }
            work();
        });
    }
    match first_error.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(e)) => Err(e),
        Err(_) => Err(Error::internal("quantizer error lock poisoned")),
    }
}

/// Elements of a view (BF16, F16 or F32 only).
fn values(view: &View) -> Result<usize> {
    let size = quant::input_size(view.info().dtype).map_err(|e| placement(view, e.to_string()))?;
    Ok(view.info().nbytes() as usize / size)
}

fn placement(view: &View, message: String) -> Error {
    Error::new(ErrorKind::Internal, message)
        .for_tensor(&view.info().name)
        .in_file(view.path())
}

/// Cut the output into one share per tensor, in item order (`ranges` sorted
/// by first value, checked disjoint and inside the output).
fn split<'a>(outputs: Outputs<'a>, ranges: &[(usize, usize, usize)], n: usize) -> Vec<Share<'a>> {
    let mut shares: Vec<Option<Share<'a>>> = (0..n).map(|_| None).collect();
    match outputs {
        Outputs::FourBit {
            packed,
            absmax,
            quant_type,
            blocksize,
        } => {
            let (mut packed, mut absmax, mut at) = (packed, absmax, 0usize);
            for &(first, len, i) in ranges {
                // skip the gap before this range, then cut it off the front
                let (_, rest) = std::mem::take(&mut packed).split_at_mut((first - at) / 2);
                let (mine, rest) = rest.split_at_mut(len / 2);
                packed = rest;
                let (_, rest) = std::mem::take(&mut absmax).split_at_mut((first - at) / blocksize);
                let (stats, rest) = rest.split_at_mut(len / blocksize);
                absmax = rest;
                at = first + len;
                shares[i] = Some(Share::FourBit(mine, stats, quant_type, blocksize));
            }
        }
        Outputs::Int8 { out, scb, cols } => {
            let (mut out, mut scb, mut at) = (out, scb, 0usize);
            for &(first, len, i) in ranges {
                let (_, rest) = std::mem::take(&mut out).split_at_mut(first - at);
                let (mine, rest) = rest.split_at_mut(len);
                out = rest;
                let (_, rest) = std::mem::take(&mut scb).split_at_mut((first - at) / cols);
                let (stats, rest) = rest.split_at_mut(len / cols);
                scb = rest;
                at = first + len;
                shares[i] = Some(Share::Int8(mine, stats, cols));
            }
        }
    }
    shares.into_iter().flatten().collect()
}

/// Quantize one tensor into its share (on `threads` threads: more than one only
/// when there are fewer tensors than threads), then release its pages.
fn quantize_one((view, slot): &(View, Slot), share: Share<'_>, threads: usize) -> Result<()> {
    view.wait_arrived(0, view.info().nbytes(), None)?;
    let (bytes, dtype) = (view.bytes(), view.info().dtype);
    let done = match share {
        Share::FourBit(packed, absmax, quant_type, blocksize) => {
            quant::quantize_4bit(bytes, dtype, quant_type, blocksize, packed, absmax, threads)
        }
        Share::Int8(out, scb, cols) => quant::quantize_int8(bytes, dtype, cols, out, scb, threads),
    };
    done.map_err(|e| placement(view, e.to_string()))?;
    slot.release(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::tests::shard;
    use crate::header::Dtype;
    use crate::reader::Checkpoint;
    use crate::stream::Stream;

    /// A shard of BF16 tensors `t0, t1, ...` of `sizes` values each, values
    /// varied per tensor so that every tensor quantizes differently.
    fn checkpoint(sizes: &[usize]) -> (tempfile::TempDir, Checkpoint) {
        let dir = tempfile::tempdir().unwrap();
        let (mut entries, mut data) = (Vec::new(), Vec::new());
        for (i, &n) in sizes.iter().enumerate() {
            let start = data.len();
            for j in 0..n {
                let v = ((i * 7919 + j * 31) % 1000) as f32 / 250.0 - 2.0 + i as f32;
                data.extend_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
            entries.push(format!(
                r#""t{i}":{{"dtype":"BF16","shape":[{n}],"data_offsets":[{start},{}]}}"#,
                data.len()
            ));
        }
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, shard(&format!("{{{}}}", entries.join(",")), &data)).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        (dir, ckpt)
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i}")).collect()
    }

    /// Each tensor quantized alone, placed at `firsts`: what the batch must give.
    fn one_by_one(ckpt: &Checkpoint, firsts: &[usize], total: usize) -> (Vec<u8>, Vec<f32>) {
        let (mut packed, mut absmax) = (vec![0xaa; total / 2], vec![-1.0; total / 64]);
        for (i, &first) in firsts.iter().enumerate() {
            let view = ckpt.view(&format!("t{i}")).unwrap();
            let n = view.len() / 2;
            quant::quantize_4bit(
                view.bytes(),
                Dtype::BF16,
                QuantType::Nf4,
                64,
                &mut packed[first / 2..(first + n) / 2],
                &mut absmax[first / 64..(first + n) / 64],
                1,
            )
            .unwrap();
        }
        (packed, absmax)
    }

    /// The first `n` tensors quantized by [`quantize_views`] on `threads` threads,
    /// placed at `firsts`, into outputs of `total` values that start as `one_by_one`'s;
    /// with the stream, to look at afterwards.
    fn batched(
        ckpt: &Checkpoint,
        n: usize,
        firsts: &[usize],
        total: usize,
        threads: usize,
    ) -> (Vec<u8>, Vec<f32>, Stream) {
        let mut stream = Stream::new(ckpt.views(&names(n)).unwrap(), 1 << 30).unwrap();
        let items = stream.next_many(n).unwrap();
        let (mut packed, mut absmax) = (vec![0xaa; total / 2], vec![-1.0; total / 64]);
        let out = Outputs::FourBit {
            packed: &mut packed,
            absmax: &mut absmax,
            quant_type: QuantType::Nf4,
            blocksize: 64,
        };
        quantize_views(&items, &firsts[..n], out, threads).unwrap();
        (packed, absmax, stream)
    }

    #[test]
    fn each_tensor_lands_in_its_range_as_if_quantized_alone() {
        let sizes = [128, 64, 256, 64, 192, 128, 64];
        let (_dir, ckpt) = checkpoint(&sizes);
        // out of order, with a gap the batch must leave as it was
        let firsts = [256, 0, 512, 64, 960, 768, 192];
        let total = 1152;
        let (want_packed, want_absmax) = one_by_one(&ckpt, &firsts, total);
        for threads in [1, 2, 3, 16] {
            let (packed, absmax, mut stream) = batched(&ckpt, sizes.len(), &firsts, total, threads);
            assert_eq!(packed, want_packed, "threads={threads}");
            assert_eq!(
                absmax.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
                want_absmax.iter().map(|a| a.to_bits()).collect::<Vec<_>>()
            );
            // every view was released as it was done: the read-ahead budget is back
            assert_eq!(stream.stats().unwrap().in_use, 0);
            stream.check().unwrap();
            assert!(stream.next().is_none());
        }
    }

    #[test]
    fn fewer_tensors_than_threads_are_split_over_them_with_the_same_bytes() {
        // large enough for the kernels to split (several of their per-thread minimum)
        let sizes = [3 * 65_536 + 64, 65_536];
        let (_dir, ckpt) = checkpoint(&sizes);
        let firsts = [65_536, 0];
        let total = sizes.iter().sum::<usize>();
        let (want_packed, want_absmax) = one_by_one(&ckpt, &firsts, total);
        for (n, threads) in [(1, 2), (1, 5), (2, 4)] {
            let (packed, absmax, _stream) = batched(&ckpt, n, &firsts, total, threads);
            let (a, b) = (firsts[0] / 2, (firsts[0] + sizes[0]) / 2);
            assert_eq!(packed[a..b], want_packed[a..b], "n={n} threads={threads}");
            if n == 2 {
                assert_eq!(packed, want_packed);
                assert_eq!(absmax, want_absmax);
            }
        }
    }

    #[test]
    fn int8_rows_land_at_their_rows() {
        let sizes = [128, 64, 192];
        let (_dir, ckpt) = checkpoint(&sizes);
        let cols = 64;
        let firsts = [3 * cols, 0, cols * 5]; // rows 3-4, 0, 5-7; rows 1-2 untouched
        let total = 8 * cols;
        let (mut want_out, mut want_scb) = (vec![7i8; total], vec![-1.0f32; total / cols]);
        for (i, &first) in firsts.iter().enumerate() {
            let view = ckpt.view(&format!("t{i}")).unwrap();
            let n = view.len() / 2;
            quant::quantize_int8(
                view.bytes(),
                Dtype::BF16,
                cols,
                &mut want_out[first..first + n],
                &mut want_scb[first / cols..(first + n) / cols],
                1,
            )
            .unwrap();
        }
        let mut stream = Stream::new(ckpt.views(&names(3)).unwrap(), 1 << 20).unwrap();
        let items = stream.next_many(3).unwrap();
        let (mut out, mut scb) = (vec![7i8; total], vec![-1.0f32; total / cols]);
        let outputs = Outputs::Int8 {
            out: &mut out,
            scb: &mut scb,
            cols,
        };
        quantize_views(&items, &firsts, outputs, 2).unwrap();
        assert_eq!(out, want_out);
        assert_eq!(scb, want_scb);
        assert!(
            out[cols..3 * cols].iter().all(|&q| q == 7),
            "rows 1-2 left alone"
        );
    }

    /// What `quantize_views` refuses, and that it wrote nothing then.
    fn refused(sizes: &[usize], firsts: &[usize], total: usize, blocksize: usize) -> Error {
        let (_dir, ckpt) = checkpoint(sizes);
        let mut stream = Stream::new(ckpt.views(&names(sizes.len())).unwrap(), 1 << 20).unwrap();
        let items = stream.next_many(sizes.len()).unwrap();
        let (mut packed, mut absmax) = (vec![0xaa; total / 2], vec![-1.0; total / 64]);
        let out = Outputs::FourBit {
            packed: &mut packed,
            absmax: &mut absmax,
            quant_type: QuantType::Nf4,
            blocksize,
        };
        let err = quantize_views(&items, firsts, out, 2).unwrap_err();
        assert!(packed.iter().all(|&b| b == 0xaa) && absmax.iter().all(|&a| a == -1.0));
        err
    }

    #[test]
    fn overlapping_misplaced_or_outside_ranges_are_refused_naming_the_tensor() {
        let err = refused(&[128, 128], &[0, 64], 256, 64);
        assert_eq!(err.tensor.as_deref(), Some("t1"), "{err}");
        assert!(
            err.to_string().contains("overlaps that of tensor 't0'"),
            "{err}"
        );
        assert!(err.file.is_some());
        // not on a block
        let err = refused(&[128, 128], &[0, 160], 320, 64);
        assert_eq!(err.tensor.as_deref(), Some("t1"), "{err}");
        // past the end
        let err = refused(&[128, 128], &[0, 192], 256, 64);
        assert_eq!(err.tensor.as_deref(), Some("t1"), "{err}");
        // a tensor that is not whole blocks
        let err = refused(&[96], &[0], 128, 64);
        assert_eq!(err.tensor.as_deref(), Some("t0"), "{err}");
        // a block size bitsandbytes does not have
        let err = refused(&[128], &[0], 128, 48);
        assert!(err.to_string().contains("blocksize"), "{err}");
    }

    #[test]
    fn a_tensor_that_is_not_bf16_f16_or_f32_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let header = r#"{"t0":{"dtype":"I16","shape":[128],"data_offsets":[0,256]}}"#;
        std::fs::write(&path, shard(header, &[0u8; 256])).unwrap();
        let ckpt = Checkpoint::open(&path).unwrap();
        let mut stream = Stream::new(ckpt.views(&names(1)).unwrap(), 1 << 20).unwrap();
        let items = stream.next_many(1).unwrap();
        let (mut packed, mut absmax) = (vec![0xaa; 64], vec![-1.0; 2]);
        let out = Outputs::FourBit {
            packed: &mut packed,
            absmax: &mut absmax,
            quant_type: QuantType::Nf4,
            blocksize: 64,
        };
        let err = quantize_views(&items, &[0], out, 1).unwrap_err();
        assert_eq!(err.tensor.as_deref(), Some("t0"), "{err}");
        assert!(err.to_string().contains("cannot quantize I16"), "{err}");
        assert!(packed.iter().all(|&b| b == 0xaa) && absmax.iter().all(|&a| a == -1.0));
    }

    #[test]
    fn mismatched_outputs_are_refused() {
        let (_dir, ckpt) = checkpoint(&[128]);
        let mut stream = Stream::new(ckpt.views(&names(1)).unwrap(), 1 << 20).unwrap();
        let items = stream.next_many(1).unwrap();
        let (mut packed, mut absmax) = (vec![0u8; 64], vec![0f32; 1]); // 2 blocks of 64
        let out = Outputs::FourBit {
            packed: &mut packed,
            absmax: &mut absmax,
            quant_type: QuantType::Nf4,
            blocksize: 64,
        };
        assert_eq!(
            quantize_views(&items, &[0], out, 1).unwrap_err().kind,
            ErrorKind::Internal
        );
        let (mut q, mut scb) = (vec![0i8; 128], vec![0f32; 3]);
        let out = Outputs::Int8 {
            out: &mut q,
            scb: &mut scb,
            cols: 64,
        };
        assert!(quantize_views(&items, &[0], out, 1).is_err());
    }

    #[test]
    fn a_file_cut_while_the_workers_read_is_reported_by_the_check_after_use() {
        let page = crate::reader::page_size();
        // tensors of 8 pages each; the cut falls inside t2
        let values = 4 * page;
        let (dir, ckpt) = checkpoint(&[values, values, values, values]);
        let path = dir.path().join("m.safetensors");
        let mut stream = Stream::new(ckpt.views(&names(4)).unwrap(), 1 << 30).unwrap();
        let items = stream.next_many(4).unwrap();
        for (view, slot) in &items {
            slot.release(view).unwrap(); // nothing left mapped: the workers fault it in
        }
        let cut = items[2].0.info().start + 3 * page as u64;
        crate::reader::tests::shrink(&path, cut);
        let total = 4 * values;
        let (mut packed, mut absmax) = (vec![0u8; total / 2], vec![0f32; total / 64]);
        let out = Outputs::FourBit {
            packed: &mut packed,
            absmax: &mut absmax,
            quant_type: QuantType::Nf4,
            blocksize: 64,
        };
        let firsts: Vec<usize> = (0..4).map(|i| i * values).collect();
        // no SIGBUS: the lost pages read as zeros...
        quantize_views(&items, &firsts, out, 2).unwrap();
        // ...which the check after use reports, naming the first tensor they hit
        let err = stream.check().unwrap_err();
        assert_eq!(err.kind, ErrorKind::Truncated);
        assert_eq!(err.tensor.as_deref(), Some("t2"), "{err}");
        assert!(err.message.contains("read as zeros"), "{err}");
    }

    #[test]
    fn next_many_hands_out_in_order_and_not_past_the_end() {
        let (_dir, ckpt) = checkpoint(&[64, 64, 64, 64]);
        let mut stream = Stream::new(ckpt.views(&names(4)).unwrap(), 1 << 20).unwrap();
        let (first, _) = stream.next().unwrap().unwrap();
        assert_eq!(first.info().name, "t0");
        let two = stream.next_many(2).unwrap();
        let got: Vec<_> = two.iter().map(|(v, _)| v.info().name.clone()).collect();
        assert_eq!(got, ["t1", "t2"]);
        for (view, slot) in &two {
            slot.release(view).unwrap(); // the caller's to release, once used
        }
        assert_eq!(stream.remaining(), 1);
        assert_eq!(stream.next_many(2).unwrap_err().kind, ErrorKind::Internal);
        let (last, _) = stream.next().unwrap().unwrap();
        assert_eq!(last.info().name, "t3");
        assert!(stream.next().is_none());
        assert_eq!(stream.stats().unwrap().in_use, 0, "all released");
    }
}
