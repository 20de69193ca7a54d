//! `header::parse` on hostile shards: it never panics, and what it accepts is
//! consistent (sized exactly `prod(shape) x bits / 8`, and the tensors tile the
//! data section exactly: from 0, no gap, no overlap, nothing after the last, as
//! safetensors requires), so the reader may trust it.
//!
//! The first input byte picks how the rest becomes a shard: odd, the rest is
//! the whole file (length prefix included); even, the next two bytes are the
//! data section's length and the rest is the JSON header, behind a correct
//! length prefix (mutating JSON rarely keeps a raw prefix right).

#![no_main]

use leanstream::header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let file = if mode % 2 == 1 || rest.len() < 2 {
        rest.to_vec()
    } else {
        let data_len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let text = &rest[2..];
        let mut file = (text.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(text);
        file.extend((0..data_len).map(|i| i as u8));
        file
    };
    let Ok(h) = header::parse(&file) else {
        return;
    };
    let data_len = file.len() as u64 - h.data_start;
    assert_eq!(h.data_start, 8 + h.header_len);
    for t in &h.tensors {
        let bits = t
            .shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(u128::from(d)))
            .and_then(|n| n.checked_mul(u128::from(t.dtype.bits())));
        assert_eq!(bits, Some(u128::from(t.nbytes()) * 8), "{t:?}");
    }
    let mut spans: Vec<(u64, u64)> = h.tensors.iter().map(|t| (t.begin, t.end)).collect();
    spans.sort_unstable();
    let mut reach = 0;
    for &(begin, end) in &spans {
        assert!(begin == reach && end >= begin, "{spans:?}");
        reach = end;
    }
    assert_eq!(reach, data_len, "{spans:?}");
});
