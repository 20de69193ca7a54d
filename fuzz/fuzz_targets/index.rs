//! Any bytes as `model.safetensors.index.json` next to two valid shards:
//! opening the folder never panics, and an accepted index yields only the
//! tensors the shards hold, with their bytes.

#![no_main]

use leanstream::reader::Checkpoint;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A U8 shard holding `tensors`, laid out contiguously.
fn shard(tensors: &[(&str, &[u8])]) -> Vec<u8> {
    let (mut entries, mut data) = (Vec::new(), Vec::new());
    for (name, bytes) in tensors {
        entries.push(format!(
            r#""{name}":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}}"#,
            bytes.len(),
            data.len(),
            data.len() + bytes.len()
        ));
        data.extend_from_slice(bytes);
    }
    let header = format!("{{{}}}", entries.join(","));
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(
            dir.join("a.safetensors"),
            shard(&[("x", b"xx"), ("y", b"y")]),
        )
        .unwrap();
        std::fs::write(dir.join("b.safetensors"), shard(&[("z", b"zzz")])).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    std::fs::write(dir.join("model.safetensors.index.json"), data).unwrap();
    let Ok(ckpt) = Checkpoint::open(dir) else {
        return;
    };
    assert!(!ckpt.is_empty());
    for name in ckpt.names() {
        let view = ckpt.view(name).unwrap();
        let expected: &[u8] = match name {
            "x" => b"xx",
            "y" => b"y",
            "z" => b"zzz",
            _ => panic!("accepted an index naming tensor {name:?}, which no shard holds"),
        };
        assert_eq!(view.bytes(), expected);
        view.check().unwrap();
    }
});
