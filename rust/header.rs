//! Parse and validate one safetensors header, completely, before any tensor
//! byte is handed out. It accepts exactly what safetensors'
//! `SafeTensors::read_metadata` + `Metadata::validate` accept, with one
//! deliberate difference: a duplicate JSON key (at any level) is an error,
//! where safetensors silently keeps the last one.
//!
//! Layout of a shard: an 8-byte little-endian header length `n`, `n` bytes of
//! UTF-8 JSON, then the data section. The JSON is an object mapping tensor
//! names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets
//! relative to the data section), plus an optional `"__metadata__"` object of
//! strings (or `null`). The data section must be exactly the concatenation of
//! the tensors' byte ranges: starting at 0, no gap, no byte after the last
//! tensor (a polyglot file hides its second payload there), every empty tensor
//! at a boundary between two tensors.
//!
//! Errors never show the file's bytes until they are known to be a
//! safetensors header (a plausible length, then a JSON object): the file may
//! be anything a model folder links to, a file of secrets included. So an
//! impossible header length is not printed, and a JSON error gives a position,
//! not text. Past that point errors name the tensor, as everywhere.
//!
//! Pure Rust, no pyo3: `cargo test --no-default-features` covers it.

use crate::error::{Error, ErrorKind, Result};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Largest accepted header, in bytes (safetensors' limit).
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// The key of the optional string-to-string metadata object.
pub const METADATA_KEY: &str = "__metadata__";

/// The element types safetensors defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E4M3FNUZ,
    F8E5M2,
    F8E5M2FNUZ,
    F8E8M0,
    F4,
    F6E2M3,
    F6E3M2,
    C64,
}

impl Dtype {
    pub const ALL: [Dtype; 22] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::U16,
        Dtype::I32,
        Dtype::U32,
        Dtype::I64,
        Dtype::U64,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
        Dtype::F8E4M3,
        Dtype::F8E4M3FNUZ,
        Dtype::F8E5M2,
        Dtype::F8E5M2FNUZ,
        Dtype::F8E8M0,
        Dtype::F4,
        Dtype::F6E2M3,
        Dtype::F6E3M2,
        Dtype::C64,
    ];

    /// The dtype string as written in headers, e.g. `"BF16"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E5M2FNUZ => "F8_E5M2FNUZ",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
            Dtype::C64 => "C64",
        }
    }

    /// The dtype a header string names (exact, case-sensitive), if any.
    pub fn parse(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Size of one element in bits (F4 and F6 pack several elements per byte).
    pub fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 8,
            Dtype::F8E4M3 | Dtype::F8E4M3FNUZ | Dtype::F8E5M2 | Dtype::F8E5M2FNUZ => 8,
            Dtype::F8E8M0 => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::I64 | Dtype::U64 | Dtype::F64 | Dtype::C64 => 64,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validated tensor entry. Offsets are relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub begin: u64,
    pub end: u64,
}

impl TensorEntry {
    pub fn nbytes(&self) -> u64 {
        self.end - self.begin
    }
}

/// A validated header: every entry is sized right, and the entries tile the
/// data section exactly (in bounds, disjoint, no gap, nothing after the last).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `n`, the length of the JSON text.
    pub header_len: u64,
    /// Absolute offset of the data section (`8 + n`).
    pub data_start: u64,
    /// Tensors in header order.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__` entries in header order (empty when absent or `null`).
    pub metadata: Vec<(String, String)>,
}

/// Parse and validate the header of a shard whose whole content is `file`
/// (usually the mapping; only the first `8 + n` bytes are read).
pub fn parse(file: &[u8]) -> Result<Header> {
    let file_len = file.len() as u64;
    let Some(prefix) = file.get(..8) else {
        return Err(Error::new(
            ErrorKind::Truncated,
            format!(
                "file is {file_len} bytes, shorter than the 8-byte header length: \
                 not a safetensors file, or truncated"
            ),
        ));
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(prefix);
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_SIZE {
        // Not shown: such a "length" is usually the first 8 bytes of some
        // other file (8 characters of a text file read as a number).
        return Err(Error::new(
            ErrorKind::HeaderTooLarge,
            format!(
                "the 8-byte header length this file starts with is impossible (larger than \
                 the {MAX_HEADER_SIZE}-byte limit): not a safetensors file, or corrupt"
            ),
        ));
    }
    // n <= 1e8, so 8 + n cannot overflow. A plausible length is shown: a cut
    // copy of a real shard is the usual story.
    if 8 + n > file_len {
        return Err(Error::new(
            ErrorKind::HeaderTooLarge,
            format!(
                "header length {n} runs past the end of the {file_len}-byte file: \
                 truncated, or not a safetensors file"
            ),
        ));
    }
    let data_start = 8 + n;
    let data_len = file_len - data_start;
    // Both bounds are <= file.len(), checked above.
    let text = &file[8..data_start as usize];
    let text = std::str::from_utf8(text).map_err(|e| {
        Error::new(
            ErrorKind::InvalidHeader,
            format!("header is not valid UTF-8 (byte {})", 8 + e.valid_up_to()),
        )
    })?;
    let json: Json = serde_json::from_str(text).map_err(|e| {
        Error::new(
            ErrorKind::InvalidHeader,
            format!("header is not valid JSON: {}", json_error(&e)),
        )
    })?;
    let Json::Object(entries) = json else {
        return Err(Error::new(
            ErrorKind::InvalidHeader,
            format!(
                "header is a JSON {}, not an object of tensor entries",
                json.kind()
            ),
        ));
    };
    check_unique_keys(&entries, |key| {
        Error::new(
            ErrorKind::InvalidHeader,
            "appears twice in the header (duplicate JSON key)",
        )
        .for_tensor(key)
    })?;

    let mut metadata = Vec::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == METADATA_KEY {
            // safetensors reads `"__metadata__": null` as no metadata
            if !matches!(value, Json::Null) {
                metadata = parse_metadata(value)?;
            }
        } else {
            let entry = parse_entry(name, value).map_err(|e| e.for_tensor_owned())?;
            tensors.push(entry);
        }
    }
    check_layout(&tensors, data_len, file_len)?;
    Ok(Header {
        header_len: n,
        data_start,
        tensors,
        metadata,
    })
}

/// An error still carrying the tensor name it belongs to (moved, not cloned).
struct EntryError(Error, String);

impl EntryError {
    fn for_tensor_owned(self) -> Error {
        let EntryError(mut e, name) = self;
        if e.tensor.is_none() {
            e.tensor = Some(name);
        }
        e
    }
}

fn parse_metadata(value: Json) -> Result<Vec<(String, String)>> {
    let Json::Object(entries) = value else {
        return Err(Error::new(
            ErrorKind::InvalidHeader,
            format!(
                "{METADATA_KEY} is a JSON {}, not an object of strings",
                value.kind()
            ),
        ));
    };
    check_unique_keys(&entries, |key| {
        Error::new(
            ErrorKind::InvalidHeader,
            format!("{METADATA_KEY} key '{key}' appears twice (duplicate JSON key)"),
        )
    })?;
    entries
        .into_iter()
        .map(|(key, value)| match value {
            Json::String(s) => Ok((key, s)),
            other => Err(Error::new(
                ErrorKind::InvalidHeader,
                format!(
                    "{METADATA_KEY} value of '{key}' is a JSON {}, not a string",
                    other.kind()
                ),
            )),
        })
        .collect()
}

fn parse_entry(name: String, value: Json) -> Result<TensorEntry, EntryError> {
    match entry_fields(value) {
        Ok(entry) => Ok(TensorEntry { name, ..entry }),
        Err(e) => Err(EntryError(e, name)),
    }
}

/// One entry, checked (its name left empty: the caller has it).
fn entry_fields(value: Json) -> Result<TensorEntry> {
    let Json::Object(fields) = value else {
        return Err(Error::new(
            ErrorKind::InvalidHeader,
            format!(
                "entry is a JSON {}, not an object with dtype, shape and data_offsets",
                value.kind()
            ),
        ));
    };
    check_unique_keys(&fields, |key| {
        Error::new(
            ErrorKind::InvalidHeader,
            format!("key '{key}' appears twice in the entry (duplicate JSON key)"),
        )
    })?;
    let field = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidHeader,
                    format!("entry has no '{key}' (needs dtype, shape and data_offsets)"),
                )
            })
    };

    let dtype = match field("dtype")? {
        Json::String(s) => Dtype::parse(s).ok_or_else(|| {
            let known: Vec<&str> = Dtype::ALL.iter().map(|d| d.as_str()).collect();
            Error::new(
                ErrorKind::UnknownDtype,
                format!("unknown dtype '{s}' (known: {})", known.join(", ")),
            )
        })?,
        other => {
            return Err(Error::new(
                ErrorKind::InvalidHeader,
                format!("dtype is a JSON {}, not a string", other.kind()),
            ))
        }
    };
    let shape = parse_shape(field("shape")?)?;
    let offsets = match field("data_offsets")? {
        Json::Array(o) if o.len() == 2 => o,
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidHeader,
                "data_offsets is not a JSON array [begin, end] of two integers",
            ))
        }
    };
    let begin = non_negative_int(&offsets[0], "data_offsets", ErrorKind::Offset)?;
    let end = non_negative_int(&offsets[1], "data_offsets", ErrorKind::Offset)?;
    if begin > end {
        return Err(Error::new(
            ErrorKind::Offset,
            format!("data_offsets [{begin}, {end}] are reversed (begin > end)"),
        ));
    }
    check_size(dtype, &shape, begin, end)?;
    Ok(TensorEntry {
        name: String::new(),
        dtype,
        shape,
        begin,
        end,
    })
}

fn parse_shape(value: &Json) -> Result<Vec<u64>> {
    let Json::Array(dims) = value else {
        return Err(Error::new(
            ErrorKind::InvalidHeader,
            "shape is not a JSON array of integers",
        ));
    };
    dims.iter()
        .map(|d| non_negative_int(d, "shape", ErrorKind::Shape))
        .collect()
}

/// `prod(shape) x dtype bits` is exactly `end - begin` bytes.
fn check_size(dtype: Dtype, shape: &[u64], begin: u64, end: u64) -> Result<()> {
    let nbits = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.bits()))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Shape,
                format!("shape {shape:?} x {dtype} overflows a 64-bit byte count"),
            )
        })?;
    let have = end - begin;
    if nbits % 8 != 0 || nbits / 8 != have {
        let need = if nbits % 8 == 0 {
            format!("{} bytes", nbits / 8)
        } else {
            format!("{nbits} bits (not a whole number of bytes)")
        };
        return Err(Error::new(
            ErrorKind::Shape,
            format!("shape {shape:?} x {dtype} needs {need} but data_offsets give {have}"),
        ));
    }
    Ok(())
}

/// A JSON integer >= 0 that fits u64. Negative or too large → `range_kind`;
/// not an integer at all → `InvalidHeader`.
fn non_negative_int(value: &Json, what: &str, range_kind: ErrorKind) -> Result<u64> {
    match value {
        Json::Number(Number::U64(v)) => Ok(*v),
        Json::Number(Number::I64(v)) => Err(Error::new(
            range_kind,
            format!("{what} has a negative value {v}"),
        )),
        // serde_json parses integers beyond the i64/u64 range as floats.
        Json::Number(Number::F64(v)) if v.fract() == 0.0 && *v <= -9.3e18 => Err(Error::new(
            range_kind,
            format!("{what} has a negative value {v}"),
        )),
        Json::Number(Number::F64(v)) if v.fract() == 0.0 && *v >= 1.8e19 => Err(Error::new(
            range_kind,
            format!("{what} has a value {v} that does not fit in 64 bits"),
        )),
        other => Err(Error::new(
            ErrorKind::InvalidHeader,
            format!(
                "{what} has a JSON {}, not a non-negative integer",
                other.kind()
            ),
        )),
    }
}

fn check_unique_keys(entries: &[(String, Json)], duplicate: impl Fn(&str) -> Error) -> Result<()> {
    let mut keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    match keys.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(duplicate(w[0])),
        None => Ok(()),
    }
}

/// The tensors tile the data section exactly, as safetensors requires (its
/// `Metadata::validate` walks the entries sorted by offsets, each starting
/// where the previous one ended, and `read_metadata` wants the last end to be
/// the end of the file). Errors, each naming the tensor at fault:
/// - two non-empty tensors share bytes: [`ErrorKind::Overlap`];
/// - a tensor ends past the end of the file: [`ErrorKind::Truncated`] when the
///   tensors tile from 0 without a gap (what a cut copy or an interrupted
///   download looks like), else [`ErrorKind::Offset`] (that tensor's offsets
///   are wrong);
/// - bytes before the first tensor or between two, or an empty tensor inside
///   another one: [`ErrorKind::Offset`];
/// - bytes after the last tensor: [`ErrorKind::TrailingData`].
fn check_layout(tensors: &[TensorEntry], data_len: u64, file_len: u64) -> Result<()> {
    let mut sorted: Vec<&TensorEntry> = tensors.iter().collect();
    sorted.sort_by_key(|t| (t.begin, t.end));
    let mut reach = 0;
    let mut last: Option<&TensorEntry> = None;
    let mut misplaced: Option<Error> = None;
    for t in sorted {
        if let Some(prev) = last.filter(|_| t.begin < reach) {
            let (name, pb, pe) = (&prev.name, prev.begin, prev.end);
            if t.end > t.begin {
                return Err(Error::new(
                    ErrorKind::Overlap,
                    format!(
                        "data_offsets [{}, {}] overlap tensor '{name}' at [{pb}, {pe}]",
                        t.begin, t.end
                    ),
                )
                .for_tensor(&t.name));
            }
            misplaced.get_or_insert_with(|| {
                Error::new(
                    ErrorKind::Offset,
                    format!(
                        "empty tensor at data offset {} lies inside tensor '{name}' at [{pb}, {pe}] \
                         (an empty tensor must sit where one tensor ends and the next begins)",
                        t.begin
                    ),
                )
                .for_tensor(&t.name)
            });
            continue;
        }
        if t.begin > reach {
            let (gap, where_) = match last {
                None => (t.begin, "before the first tensor".to_owned()),
                Some(prev) => (t.begin - reach, format!("after tensor '{}'", prev.name)),
            };
            misplaced.get_or_insert_with(|| {
                Error::new(
                    ErrorKind::Offset,
                    format!(
                        "data_offsets [{}, {}] leave a gap: data bytes [{reach}, {}) \
                         ({gap} bytes {where_}) belong to no tensor",
                        t.begin, t.end, t.begin
                    ),
                )
                .for_tensor(&t.name)
            });
        }
        reach = t.end;
        last = Some(t);
    }
    // The first tensor (in offset order) that crosses the end of the file.
    let past_end = tensors
        .iter()
        .filter(|t| t.end > data_len)
        .min_by_key(|t| (t.begin, t.end));
    match (past_end, misplaced) {
        (Some(t), Some(_)) => Err(Error::new(
            ErrorKind::Offset,
            format!(
                "data_offsets [{}, {}] point past the end of the {data_len}-byte data section",
                t.begin, t.end
            ),
        )
        .for_tensor(&t.name)),
        (Some(t), None) => Err(Error::new(
            ErrorKind::Truncated,
            format!(
                "ends at data byte {} but the data section has only {data_len} bytes: \
                 the file is {file_len} bytes, {} short of what its header describes \
                 (truncated copy or interrupted download?)",
                t.end,
                reach - data_len
            ),
        )
        .for_tensor(&t.name)),
        (None, Some(e)) => Err(e),
        (None, None) if reach < data_len => {
            let extra = data_len - reach;
            let what = match last {
                Some(t) => format!(
                    "the {extra} bytes after the last tensor '{}' (data bytes [{reach}, {data_len}))",
                    t.name
                ),
                None => format!(
                    "the header lists no tensor, but the data section has {extra} bytes: they"
                ),
            };
            Err(Error::new(
                ErrorKind::TrailingData,
                format!(
                    "{what} belong to no tensor (safetensors refuses this too: a second payload \
                     can hide there)"
                ),
            ))
        }
        (None, None) => Ok(()),
    }
}

/// A JSON number as parsed, before any range check.
#[derive(Debug, Clone, PartialEq)]
pub enum Number {
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A JSON value whose objects keep every key in order, duplicates included
/// (`serde_json::Value` silently keeps the last of duplicate keys), so that
/// validation can refuse them. Nesting depth is bounded by serde_json's
/// recursion limit.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// Word for the kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "boolean",
            Json::Number(_) => "number",
            Json::String(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }

    /// Convert to `serde_json::Value` (for re-serialising), refusing
    /// duplicate keys at any depth; the error names the duplicate key.
    pub fn into_value(self) -> Result<serde_json::Value, String> {
        Ok(match self {
            Json::Null => serde_json::Value::Null,
            Json::Bool(b) => serde_json::Value::Bool(b),
            Json::Number(Number::U64(v)) => v.into(),
            Json::Number(Number::I64(v)) => v.into(),
            Json::Number(Number::F64(v)) => serde_json::Number::from_f64(v)
                .map_or(serde_json::Value::Null, serde_json::Value::Number),
            Json::String(s) => serde_json::Value::String(s),
            Json::Array(items) => serde_json::Value::Array(
                items
                    .into_iter()
                    .map(Json::into_value)
                    .collect::<Result<_, _>>()?,
            ),
            Json::Object(entries) => {
                let mut map = serde_json::Map::with_capacity(entries.len());
                for (key, value) in entries {
                    let value = value.into_value()?;
                    if map.contains_key(&key) {
                        return Err(key);
                    }
                    map.insert(key, value);
                }
                serde_json::Value::Object(map)
            }
        })
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        Ok(Json::Number(Number::U64(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Json, E> {
        // serde_json only calls this for negative numbers.
        Ok(match u64::try_from(v) {
            Ok(u) => Json::Number(Number::U64(u)),
            Err(_) => Json::Number(Number::I64(v)),
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Number(Number::F64(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
        while let Some((key, value)) = map.next_entry::<String, Json>()? {
            entries.push((key, value));
        }
        Ok(Json::Object(entries))
    }
}

/// What is wrong with JSON text, by position only: the text may be another
/// file's bytes (a secret), so none of it is quoted. serde_json's syntax
/// errors are fixed phrases plus a position ("expected `:` at line 1 column
/// 15"); its data errors (`invalid type: string "..."`) quote the value and are
/// replaced by one phrase. [`Json`] accepts any value, so those arise only for
/// typed targets.
pub fn json_error(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => e.to_string(),
        serde_json::error::Category::Data | serde_json::error::Category::Io => format!(
            "a value of the wrong kind at line {} column {}",
            e.line(),
            e.column()
        ),
    }
}

/// Parse JSON text into a [`Json`] that keeps duplicate keys.
pub fn parse_json(text: &str) -> Result<Json, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A shard: length prefix + `header` JSON text + `data`.
    pub fn shard(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn kind_of(bytes: &[u8]) -> ErrorKind {
        parse(bytes).expect_err("should be refused").kind
    }

    fn err_of(header: &str, data_len: usize) -> Error {
        parse(&shard(header, &vec![0; data_len])).expect_err("should be refused")
    }

    #[test]
    fn parses_a_valid_header() {
        let h = r#"{"__metadata__":{"format":"pt"},
            "b":{"dtype":"F32","shape":[2,2],"data_offsets":[4,20]},
            "a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},
            "s":{"dtype":"I64","shape":[],"data_offsets":[20,28]},
            "e":{"dtype":"F16","shape":[3,0],"data_offsets":[28,28]}}  "#;
        let bytes = shard(h, &[0; 28]);
        let header = parse(&bytes).unwrap();
        assert_eq!(header.header_len, h.len() as u64);
        assert_eq!(header.data_start, 8 + h.len() as u64);
        assert_eq!(header.metadata, vec![("format".into(), "pt".into())]);
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a", "s", "e"]);
        assert_eq!(header.tensors[0].shape, [2, 2]);
        assert_eq!(header.tensors[0].dtype, Dtype::F32);
        assert_eq!(header.tensors[2].nbytes(), 8);
        assert_eq!(header.tensors[3].nbytes(), 0);
    }

    #[test]
    fn empty_header_object_is_valid() {
        let header = parse(&shard("{}", b"")).unwrap();
        assert!(header.tensors.is_empty());
    }

    /// The data section is exactly the tensors' bytes, as safetensors requires.
    #[test]
    fn bytes_after_the_last_tensor_are_trailing_data() {
        let h = r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},
                    "b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#;
        assert!(parse(&shard(h, &[0; 4])).is_ok());
        let e = err_of(h, 10);
        assert_eq!(e.kind, ErrorKind::TrailingData);
        assert_eq!(e.tensor, None);
        assert!(
            e.message.contains("6 bytes after the last tensor 'b'"),
            "{e}"
        );
        // even one byte; and an empty header with data (a polyglot's payload)
        assert_eq!(err_of(h, 5).kind, ErrorKind::TrailingData);
        let e = err_of("{}", 3);
        assert_eq!(e.kind, ErrorKind::TrailingData);
        assert!(e.message.contains("no tensor"), "{e}");
        let e = err_of(r#"{"__metadata__":{"format":"pt"}}"#, 1);
        assert_eq!(e.kind, ErrorKind::TrailingData);
        // only empty tensors: the data section must be empty too
        let z = r#"{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#;
        assert!(parse(&shard(z, b"")).is_ok());
        assert_eq!(err_of(z, 4).kind, ErrorKind::TrailingData);
    }

    #[test]
    fn gaps_in_the_data_section_are_offset_errors() {
        // data not starting at offset 0
        let e = err_of(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
            4,
        );
        assert_eq!(e.kind, ErrorKind::Offset);
        assert_eq!(e.tensor.as_deref(), Some("a"));
        assert!(e.message.contains("gap"), "{e}");
        assert!(e.message.contains("before the first tensor"), "{e}");
        // a hole between two tensors
        let e = err_of(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},
                "b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#,
            5,
        );
        assert_eq!(e.kind, ErrorKind::Offset);
        assert_eq!(e.tensor.as_deref(), Some("b"));
        assert!(e.message.contains("data bytes [2, 3)"), "{e}");
        assert!(e.message.contains("after tensor 'a'"), "{e}");
        // an empty tensor far past the others is a gap too
        let e = err_of(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},
                "z":{"dtype":"U8","shape":[0],"data_offsets":[9,9]}}"#,
            2,
        );
        assert_eq!(e.kind, ErrorKind::Offset);
        assert_eq!(e.tensor.as_deref(), Some("z"));
    }

    #[test]
    fn empty_tensors_sit_between_tensors() {
        // at the start, between two tensors, at the end, several at one offset
        let ok = r#"{"s":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},
                     "a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                     "m":{"dtype":"F32","shape":[2,0],"data_offsets":[4,4]},
                     "n":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},
                     "b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},
                     "e":{"dtype":"U8","shape":[0],"data_offsets":[6,6]}}"#;
        assert!(parse(&shard(ok, &[0; 6])).is_ok());
        // inside another tensor's range: safetensors' InvalidOffset
        let e = err_of(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                "z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}}"#,
            4,
        );
        assert_eq!(e.kind, ErrorKind::Offset);
        assert_eq!(e.tensor.as_deref(), Some("z"));
        assert!(e.message.contains("inside tensor 'a' at [0, 4]"), "{e}");
    }

    #[test]
    fn metadata_null_is_no_metadata() {
        let h = r#"{"__metadata__":null,"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let header = parse(&shard(h, &[0])).unwrap();
        assert!(header.metadata.is_empty());
        assert_eq!(header.tensors.len(), 1);
        assert!(parse(&shard(r#"{"__metadata__":null}"#, b"")).is_ok());
        // other non-objects are still refused
        for bad in ["1", "\"pt\"", "[]", "true"] {
            let e = err_of(&format!(r#"{{"__metadata__":{bad}}}"#), 0);
            assert_eq!(e.kind, ErrorKind::InvalidHeader, "{bad}: {e}");
        }
    }

    /// A shard with one tensor of each of the 22 safetensors dtypes.
    #[test]
    fn every_safetensors_dtype_parses() {
        assert_eq!(Dtype::ALL.len(), 22);
        let mut entries = Vec::new();
        let mut offset = 0;
        for (i, d) in Dtype::ALL.iter().enumerate() {
            let n = 2 * 4 * d.bits() / 8; // shape [2, 4]: whole bytes for every dtype
            entries.push(format!(
                r#""t{i}":{{"dtype":"{d}","shape":[2,4],"data_offsets":[{offset},{}]}}"#,
                offset + n
            ));
            offset += n;
        }
        let h = format!("{{{}}}", entries.join(","));
        let header = parse(&shard(&h, &vec![0; offset as usize])).unwrap();
        let dtypes: Vec<Dtype> = header.tensors.iter().map(|t| t.dtype).collect();
        assert_eq!(dtypes, Dtype::ALL);
        for (name, bits) in [("F8_E4M3FNUZ", 8), ("F8_E5M2FNUZ", 8), ("F6_E3M2", 6)] {
            assert_eq!(Dtype::parse(name).map(Dtype::bits), Some(bits), "{name}");
        }
    }

    #[test]
    fn dtypes_roundtrip_and_sizes() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::parse(d.as_str()), Some(d));
        }
        assert_eq!(Dtype::parse("bf16"), None);
        assert_eq!(Dtype::BF16.bits(), 16);
        assert_eq!(Dtype::F8E4M3.bits(), 8);
        assert_eq!(Dtype::F4.bits(), 4);
        assert_eq!(Dtype::C64.bits(), 64);
        let h = r#"{"a":{"dtype":"F4","shape":[3,2],"data_offsets":[0,3]}}"#;
        assert!(parse(&shard(h, &[0; 3])).is_ok());
        let h = r#"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#;
        assert_eq!(err_of(h, 2).kind, ErrorKind::Shape);
    }

    #[test]
    fn short_files_are_truncated() {
        assert_eq!(kind_of(b""), ErrorKind::Truncated);
        assert_eq!(kind_of(&[1, 0, 0]), ErrorKind::Truncated);
    }

    #[test]
    fn header_length_limits() {
        let mut bytes = (MAX_HEADER_SIZE + 1).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_eq!(kind_of(&bytes), ErrorKind::HeaderTooLarge);
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert_eq!(kind_of(&bytes), ErrorKind::HeaderTooLarge);
        let mut bytes = 100u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = parse(&bytes).unwrap_err();
        assert_eq!(e.kind, ErrorKind::HeaderTooLarge);
        assert!(e.message.contains("past the end"), "{e}");
        // a plausible length (within the limit) is shown: a cut copy's story
        assert!(e.message.contains("header length 100 "), "{e}");
    }

    /// Regression (issue 24): a text file in place of a shard (e.g. a link to a
    /// file of secrets) was reported as "header length 5927657758933604161",
    /// which is its first 8 bytes, b"AWS_SECR", as a number. An impossible
    /// length is named as such, never shown.
    #[test]
    fn impossible_header_length_is_not_echoed() {
        let secret = b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n";
        let n = u64::from_le_bytes(secret[..8].try_into().unwrap());
        let e = parse(secret).unwrap_err();
        assert_eq!(e.kind, ErrorKind::HeaderTooLarge);
        assert!(!e.message.contains(&n.to_string()), "{e}");
        assert!(!e.message.contains(&format!("{n:x}")), "{e}");
        assert!(!e.message.contains("AWS"), "{e}");
        assert!(e.message.contains("8-byte header length"), "{e}");
        assert!(e.message.contains("limit"), "{e}");
        for n in [MAX_HEADER_SIZE + 1, u64::MAX] {
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend_from_slice(b"{}");
            let e = parse(&bytes).unwrap_err();
            assert!(!e.message.contains(&n.to_string()), "{e}");
        }
    }

    /// Regression (issue 24): a header that is not JSON is reported by
    /// position, never by quoting the text (it may be another file's bytes).
    #[test]
    fn json_errors_do_not_quote_the_header() {
        for text in [
            r#"{"s3cr3t_k3y": tru}"#,
            r#"{"s3cr3t_k3y" 1}"#,
            "{\"a\": \"s3cr3t_k3y\u{1}\"}",
            r#"{"a": "s3cr3t_k3y\q"}"#,
            r#"{"a": "\ud800s3cr3t_k3y"}"#,
            r#"{} "s3cr3t_k3y""#,
            r#"{"a": s3cr3t_k3y}"#,
            r#"{"a": 1e99999, "s3cr3t_k3y": 1}"#,
            "s3cr3t_k3y",
        ] {
            let e = err_of(text, 0);
            assert_eq!(e.kind, ErrorKind::InvalidHeader, "{text}: {e}");
            assert!(e.message.contains("not valid JSON"), "{text}: {e}");
            assert!(e.message.contains(" at line 1 column "), "{text}: {e}");
            assert!(!e.message.contains("s3cr3t"), "{text}: {e}");
        }
        // serde_json's data errors quote the value: not passed on
        let e = serde_json::from_str::<u8>(r#""s3cr3t_k3y""#).unwrap_err();
        assert!(e.to_string().contains("s3cr3t"), "{e}");
        assert_eq!(
            json_error(&e),
            "a value of the wrong kind at line 1 column 12"
        );
    }

    #[test]
    fn invalid_utf8_json_and_non_objects() {
        let mut bytes = 4u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{\xff}\x00");
        let e = parse(&bytes).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidHeader);
        assert!(e.message.contains("UTF-8"), "{e}");
        let e = err_of("{\"a\":", 0);
        assert_eq!(e.kind, ErrorKind::InvalidHeader);
        assert!(e.message.contains("not valid JSON"), "{e}");
        let e = err_of("[1, 2]", 0);
        assert_eq!(e.kind, ErrorKind::InvalidHeader);
        assert!(e.message.contains("array, not an object"), "{e}");
        assert_eq!(err_of(r#"{"a": 3}"#, 0).kind, ErrorKind::InvalidHeader);
    }

    #[test]
    fn duplicate_keys_are_refused_at_every_level() {
        let e = err_of(
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},
                "a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            2,
        );
        assert_eq!(e.kind, ErrorKind::InvalidHeader);
        assert_eq!(e.tensor.as_deref(), Some("a"));
        assert!(e.message.contains("twice"), "{e}");
        let e = err_of(
            r#"{"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert_eq!(e.kind, ErrorKind::InvalidHeader);
        assert_eq!(e.tensor.as_deref(), Some("a"));
        let e = err_of(r#"{"__metadata__":{"k":"1","k":"2"}}"#, 0);
        assert_eq!(e.kind, ErrorKind::InvalidHeader);
        assert!(e.message.contains("'k'"), "{e}");
    }

    #[test]
    fn metadata_must_be_strings() {
        let e = err_of(r#"{"__metadata__":{"k":1}}"#, 0);
        assert_eq!(e.kind, ErrorKind::InvalidHeader);
        assert!(e.message.contains("not a string"), "{e}");
        let e = err_of(r#"{"__metadata__":["k"]}"#, 0);
        assert_eq!(e.kind, ErrorKind::InvalidHeader);
    }

    #[test]
    fn missing_and_mistyped_fields() {
        for h in [
            r#"{"a":{"shape":[1],"data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","shape":[1]}}"#,
            r#"{"a":{"dtype":8,"shape":[1],"data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","shape":"1","data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}}"#,
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
            r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,"1"]}}"#,
        ] {
            let e = err_of(h, 1);
            assert_eq!(e.kind, ErrorKind::InvalidHeader, "{h}: {e}");
            assert_eq!(e.tensor.as_deref(), Some("a"), "{h}");
        }
    }

    #[test]
    fn unknown_dtype() {
        let e = err_of(
            r#"{"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert_eq!(e.kind, ErrorKind::UnknownDtype);
        assert_eq!(e.tensor.as_deref(), Some("w"));
        assert!(e.message.contains("'F7'"), "{e}");
    }

    #[test]
    fn shape_errors() {
        let e = err_of(
            r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
            1,
        );
        assert_eq!(e.kind, ErrorKind::Shape);
        let e = err_of(
            r#"{"w":{"dtype":"U8","shape":[1e30],"data_offsets":[0,1]}}"#,
            1,
        );
        assert_eq!(e.kind, ErrorKind::Shape);
        let e = err_of(
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,1]}}"#,
            1,
        );
        assert_eq!(e.kind, ErrorKind::Shape);
        assert!(e.message.contains("overflows"), "{e}");
        let e = err_of(
            r#"{"model.layers.0.mlp.up_proj.weight":{"dtype":"BF16","shape":[11008,4096],"data_offsets":[0,90177534]}}"#,
            0,
        );
        assert_eq!(e.kind, ErrorKind::Shape);
        assert_eq!(
            e.message,
            "shape [11008, 4096] x BF16 needs 90177536 bytes but data_offsets give 90177534"
        );
    }

    #[test]
    fn offset_errors() {
        let e = err_of(
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[2,1]}}"#,
            2,
        );
        assert_eq!(e.kind, ErrorKind::Offset);
        assert!(e.message.contains("reversed"), "{e}");
        let e = err_of(
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}}"#,
            2,
        );
        assert_eq!(e.kind, ErrorKind::Offset);
        // A gap before w: the offsets are wrong, not the file short.
        let e = err_of(
            r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#,
            4,
        );
        assert_eq!(e.kind, ErrorKind::Offset);
        assert_eq!(e.tensor.as_deref(), Some("w"));
    }

    #[test]
    fn truncated_data_section() {
        let h = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                    "b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#;
        let e = err_of(h, 6);
        assert_eq!(e.kind, ErrorKind::Truncated);
        assert_eq!(e.tensor.as_deref(), Some("b"));
        assert!(e.message.contains("2 short"), "{e}");
    }

    #[test]
    fn overlaps() {
        let e = err_of(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                "b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#,
            5,
        );
        assert_eq!(e.kind, ErrorKind::Overlap);
        assert_eq!(e.tensor.as_deref(), Some("b"));
        assert!(e.message.contains("'a'"), "{e}");
        // the same range twice, and one tensor inside another
        let e = err_of(
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                "b":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
            4,
        );
        assert_eq!(e.kind, ErrorKind::Overlap);
        let e = err_of(
            r#"{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},
                "b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}"#,
            8,
        );
        assert_eq!(e.kind, ErrorKind::Overlap);
        assert_eq!(e.tensor.as_deref(), Some("b"));
    }

    #[test]
    fn json_into_value_refuses_nested_duplicates() {
        let j = parse_json(r#"{"a":{"b":1,"b":2}}"#).unwrap();
        assert_eq!(j.into_value(), Err("b".to_owned()));
        let j = parse_json(r#"{"a":[1,-2,0.5,null,true,"s"]}"#).unwrap();
        assert!(j.into_value().is_ok());
    }

    /// The entries, sorted by offsets, each start where the previous one
    /// ended, from 0 to exactly `data_len` (safetensors' rule).
    fn tiles(h: &Header, data_len: u64) -> bool {
        let mut spans: Vec<(u64, u64)> = h.tensors.iter().map(|t| (t.begin, t.end)).collect();
        spans.sort_unstable();
        let mut reach = 0;
        spans.iter().all(|&(b, e)| {
            let ok = b == reach && e >= b;
            reach = e;
            ok
        }) && reach == data_len
    }

    fn valid_shard() -> Vec<u8> {
        let h = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]},"c":{"dtype":"BOOL","shape":[],"data_offsets":[22,23]}}"#;
        shard(h, &[7; 23])
    }

    /// A JSON number that stresses the parser: small, a page or two, huge,
    /// u64::MAX, beyond 64 bits, or negative.
    fn hostile_number() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (0u64..40).prop_map(|n| n.to_string()),
            1 => (4090u64..4100).prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => Just(u64::MAX.to_string()),
            1 => Just("18446744073709551616".to_owned()),
            1 => (1i64..1000).prop_map(|n| (-n).to_string()),
            1 => Just("1.5".to_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn random_header_text_never_panics(text in "\\PC{0,200}", data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse(&shard(&text, &data));
        }

        #[test]
        fn mutated_valid_shards_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = valid_shard();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if truncate {
                let n = cut.index(bytes.len());
                bytes.truncate(n);
            }
            if let Ok(h) = parse(&bytes) {
                // Whatever is accepted tiles the data section exactly.
                let data_len = bytes.len() as u64 - h.data_start;
                prop_assert!(tiles(&h, data_len), "{:?}", h.tensors);
            }
        }

        /// Hostile but well-formed JSON: any dtype string, shapes and offsets
        /// from a mix of small, huge and negative numbers. Never a panic, and
        /// whatever is accepted is consistent: in bounds, sized exactly
        /// `prod(shape) x bits / 8` (computed here without overflow), disjoint.
        #[test]
        fn accepted_entries_are_consistent(
            entries in proptest::collection::vec(
                (
                    prop_oneof![
                        4 => proptest::sample::select(Dtype::ALL.to_vec()).prop_map(|d| d.as_str().to_owned()),
                        1 => "[A-Z0-9_]{0,8}",
                    ],
                    proptest::collection::vec(hostile_number(), 0..4),
                    (hostile_number(), hostile_number()),
                ),
                0..6,
            ),
            data_len in 0usize..96,
        ) {
            let text: Vec<String> = entries
                .iter()
                .enumerate()
                .map(|(i, (dtype, shape, (b, e)))| {
                    format!(
                        r#""t{i}":{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{b},{e}]}}"#,
                        shape.join(",")
                    )
                })
                .collect();
            let bytes = shard(&format!("{{{}}}", text.join(",")), &vec![7; data_len]);
            if let Ok(h) = parse(&bytes) {
                for t in &h.tensors {
                    let elements = t.shape.iter().try_fold(1u128, |acc, &d| acc.checked_mul(u128::from(d)));
                    let bits = elements.and_then(|n| n.checked_mul(u128::from(t.dtype.bits())));
                    prop_assert_eq!(bits, Some(u128::from(t.nbytes()) * 8));
                }
                prop_assert!(tiles(&h, data_len as u64), "{:?}", h.tensors);
            }
        }

        #[test]
        fn generated_valid_headers_parse(sizes in proptest::collection::vec((0u64..5, 0u64..5), 0..12)) {
            let mut entries = Vec::new();
            let mut offset = 0;
            for (i, (rows, cols)) in sizes.iter().enumerate() {
                let n = rows * cols * 2;
                entries.push(format!(
                    r#""t{i}":{{"dtype":"F16","shape":[{rows},{cols}],"data_offsets":[{offset},{}]}}"#,
                    offset + n
                ));
                offset += n;
            }
            let header = format!("{{{}}}", entries.join(","));
            let h = parse(&shard(&header, &vec![0; offset as usize])).unwrap();
            prop_assert_eq!(h.tensors.len(), sizes.len());
            let total: u64 = h.tensors.iter().map(TensorEntry::nbytes).sum();
            prop_assert_eq!(total, offset);
        }
    }
}
