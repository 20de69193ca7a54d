//! `header::parse` on hostile shards: it never panics, and what it accepts is
//! consistent (in bounds, sized exactly `prod(shape) x bits / 8`, disjoint), so
//! the reader may trust it.
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
    let mut spans = Vec::new();
    for t in &h.tensors {
        assert!(t.begin <= t.end && t.end <= data_len, "{t:?}");
        let bits = t
            .shape
            .iter()
            .try_fold(1u128, |acc, &d| acc.checked_mul(u128::from(d)))
            .and_then(|n| n.checked_mul(u128::from(t.dtype.bits())));
        assert_eq!(bits, Some(u128::from(t.nbytes()) * 8), "{t:?}");
        if t.end > t.begin {
            spans.push((t.begin, t.end));
        }
    }
    spans.sort_unstable();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
});
