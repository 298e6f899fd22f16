//! Calibration tables for TensorRT: the native cache (`calibration.cache`) and ONNX Runtime's
//! TensorRT-EP flatbuffers table (`calibration.flatbuffers`).
//!
//! Native cache: a header line `TRT-<version>-<Calibrator>`, then one line per tensor
//! `name: <8 hex digits of the IEEE-754 f32 scale = amax / 127>`.
//!
//! ONNX Runtime's table (schema of its TensorRT EP, `CalTableFlatBuffers`):
//! ```text
//! table KeyValue { key: string (key); value: string; }
//! table TrtTable { dict: [KeyValue]; }
//! root_type TrtTable;
//! ```
//! with `value` = amax as decimal text. Written here with the `flatbuffers` builder directly
//! (no `flatc` at build time); entries sorted by key, as a `(key)` field requires.

use std::fmt::Write;

use flatbuffers::{FlatBufferBuilder, Follow, ForwardsUOffset, VOffsetT, Vector, WIPOffset};

use crate::{Error, Result};

/// TensorRT version written in cache headers (10.1: the first 10.x that reads explicit QDQ
/// and implicit calibration caches side by side).
pub const TRT_VERSION: u32 = 10_100;

/// The INT8 scale TensorRT stores for a symmetric range: `amax / 127`.
pub fn int8_scale(amax: f32) -> f32 {
    amax / 127.0
}

/// The 8 hex digits (big-endian bit pattern, leading zeros kept) of an f32.
pub fn f32_hex(v: f32) -> String {
    format!("{:08x}", v.to_bits())
}

fn check_amax(name: &str, a: f32) -> Result<()> {
    if !a.is_finite() || a < 0.0 {
        return Err(Error::BadRange {
            tensor: name.to_string(),
            amax: a,
        });
    }
    Ok(())
}

/// Renders a TensorRT calibration cache: `TRT-<trt_version>-<calibrator>` then one
/// `name: hex(scale)` line per tensor, in the order given.
pub fn trt_cache(trt_version: u32, calibrator: &str, amax: &[(String, f32)]) -> Result<String> {
    let mut s = format!("TRT-{trt_version}-{calibrator}\n");
    for (name, a) in amax {
        check_amax(name, *a)?;
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{name}: {}", f32_hex(int8_scale(*a)));
    }
    Ok(s)
}

/// A parsed TensorRT cache.
#[derive(Debug, Clone, PartialEq)]
pub struct TrtCache {
    /// Version number of the header.
    pub version: u32,
    /// Calibrator name of the header.
    pub calibrator: String,
    /// `(tensor, scale)` in file order.
    pub scales: Vec<(String, f32)>,
}

/// Parses a TensorRT calibration cache (`what` names the source in errors).
pub fn parse_trt_cache(text: &str, what: &str) -> Result<TrtCache> {
    let bad = |line: usize, message: String| Error::Table {
        what: what.to_string(),
        line,
        message,
    };
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(|| {
        bad(
            1,
            "empty file, expected a `TRT-<version>-<calibrator>` header".into(),
        )
    })?;
    let rest = header
        .strip_prefix("TRT-")
        .ok_or_else(|| bad(1, format!("header {header:?} does not start with `TRT-`")))?;
    let (ver, cal) = rest.split_once('-').ok_or_else(|| {
        bad(
            1,
            format!("header {header:?}: expected TRT-<version>-<calibrator>"),
        )
    })?;
    let version = ver
        .parse()
        .map_err(|_| bad(1, format!("version {ver:?} is not a number")))?;
    let mut scales = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (name, hex) = line.rsplit_once(": ").ok_or_else(|| {
            bad(
                i + 2,
                format!("expected `name: <8 hex digits>`, got {line:?}"),
            )
        })?;
        let bits = u32::from_str_radix(hex.trim(), 16)
            .ok()
            .filter(|_| hex.trim().len() == 8)
            .ok_or_else(|| bad(i + 2, format!("{hex:?} is not 8 hex digits")))?;
        scales.push((name.to_string(), f32::from_bits(bits)));
    }
    Ok(TrtCache {
        version,
        calibrator: cal.to_string(),
        scales,
    })
}

const VT_KEY: VOffsetT = 4;
const VT_VALUE: VOffsetT = 6;
const VT_DICT: VOffsetT = 4;

/// The amax text stored as a table value (shortest text that reads back to the same f32).
pub fn amax_text(a: f32) -> String {
    format!("{a:?}")
}

/// Builds ONNX Runtime's TensorRT calibration table (`TrtTable` root) for `(tensor, amax)`.
pub fn ort_trt_table(amax: &[(String, f32)]) -> Result<Vec<u8>> {
    let mut sorted: Vec<&(String, f32)> = amax.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = sorted.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Stats(format!("tensor `{}` listed twice", w[0].0)));
    }
    let mut b = FlatBufferBuilder::new();
    let mut entries = Vec::with_capacity(sorted.len());
    for (name, a) in sorted {
        check_amax(name, *a)?;
        let k = b.create_string(name);
        let v = b.create_string(&amax_text(*a));
        let t = b.start_table();
        b.push_slot_always::<WIPOffset<_>>(VT_KEY, k);
        b.push_slot_always::<WIPOffset<_>>(VT_VALUE, v);
        entries.push(b.end_table(t));
    }
    let dict = b.create_vector(&entries);
    let t = b.start_table();
    b.push_slot_always::<WIPOffset<_>>(VT_DICT, dict);
    let root = b.end_table(t);
    b.finish_minimal(root);
    Ok(b.finished_data().to_vec())
}

/// A `KeyValue` read from a table.
struct KeyValue<'a> {
    tab: flatbuffers::Table<'a>,
}

impl<'a> Follow<'a> for KeyValue<'a> {
    type Inner = KeyValue<'a>;
    unsafe fn follow(buf: &'a [u8], loc: usize) -> Self::Inner {
        KeyValue {
            // SAFETY: called by the flatbuffers reader on a verified buffer.
            tab: unsafe { flatbuffers::Table::new(buf, loc) },
        }
    }
}

impl flatbuffers::Verifiable for KeyValue<'_> {
    fn run_verifier(
        v: &mut flatbuffers::Verifier,
        pos: usize,
    ) -> std::result::Result<(), flatbuffers::InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_field::<ForwardsUOffset<&str>>("key", VT_KEY, true)?
            .visit_field::<ForwardsUOffset<&str>>("value", VT_VALUE, false)?
            .finish();
        Ok(())
    }
}

/// The root `TrtTable`.
struct TrtTable<'a> {
    tab: flatbuffers::Table<'a>,
}

impl<'a> Follow<'a> for TrtTable<'a> {
    type Inner = TrtTable<'a>;
    unsafe fn follow(buf: &'a [u8], loc: usize) -> Self::Inner {
        TrtTable {
            // SAFETY: called by the flatbuffers reader on a verified buffer.
            tab: unsafe { flatbuffers::Table::new(buf, loc) },
        }
    }
}

impl flatbuffers::Verifiable for TrtTable<'_> {
    fn run_verifier(
        v: &mut flatbuffers::Verifier,
        pos: usize,
    ) -> std::result::Result<(), flatbuffers::InvalidFlatbuffer> {
        v.visit_table(pos)?
            .visit_field::<ForwardsUOffset<Vector<'_, ForwardsUOffset<KeyValue>>>>(
                "dict", VT_DICT, false,
            )?
            .finish();
        Ok(())
    }
}

/// Reads an ONNX Runtime TensorRT calibration table back: `(key, value)` in stored order.
/// The buffer is verified first; `what` names the source in errors.
pub fn read_ort_trt_table(bytes: &[u8], what: &str) -> Result<Vec<(String, String)>> {
    let root = flatbuffers::root::<TrtTable>(bytes).map_err(|e| Error::Table {
        what: what.to_string(),
        line: 0,
        message: format!("not a TrtTable flatbuffer: {e}"),
    })?;
    // SAFETY: the buffer was verified by `root` (field types checked by the verifiers above).
    let dict = unsafe {
        root.tab
            .get::<ForwardsUOffset<Vector<'_, ForwardsUOffset<KeyValue>>>>(VT_DICT, None)
    };
    let mut out = Vec::new();
    if let Some(dict) = dict {
        for kv in dict.iter() {
            // SAFETY: verified buffer; `key` is required, `value` optional.
            let key = unsafe { kv.tab.get::<ForwardsUOffset<&str>>(VT_KEY, None) };
            let value = unsafe { kv.tab.get::<ForwardsUOffset<&str>>(VT_VALUE, None) };
            out.push((
                key.unwrap_or_default().to_string(),
                value.unwrap_or_default().to_string(),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_of_known_floats_keeps_leading_zeros() {
        assert_eq!(f32_hex(1.0), "3f800000");
        assert_eq!(f32_hex(0.0), "00000000");
        assert_eq!(f32_hex(1e-40), "000116c2");
        assert_eq!(f32_hex(-2.0), "c0000000");
        // 127 / 127 = 1.0
        assert_eq!(f32_hex(int8_scale(127.0)), "3f800000");
    }

    #[test]
    fn cache_has_the_header_and_one_line_per_tensor() -> Result<()> {
        let c = trt_cache(
            10_100,
            "EntropyCalibration2",
            &[("input_ids".into(), 127.0), ("x".into(), 0.0)],
        )?;
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(
            lines,
            vec![
                "TRT-10100-EntropyCalibration2",
                "input_ids: 3f800000",
                "x: 00000000"
            ]
        );
        assert!(trt_cache(1, "MinMaxCalibration", &[("bad".into(), f32::NAN)]).is_err());
        assert!(trt_cache(1, "MinMaxCalibration", &[("neg".into(), -1.0)]).is_err());
        Ok(())
    }

    #[test]
    fn cache_round_trip_parses_what_was_written() -> Result<()> {
        let amax = vec![
            ("layers.0/attn/MatMul_3".to_string(), 3.25f32),
            ("a: tricky name".to_string(), 1e-3),
            ("zero".to_string(), 0.0),
        ];
        let text = trt_cache(TRT_VERSION, "MinMaxCalibration", &amax)?;
        let c = parse_trt_cache(&text, "test")?;
        assert_eq!(c.version, TRT_VERSION);
        assert_eq!(c.calibrator, "MinMaxCalibration");
        assert_eq!(c.scales.len(), 3);
        for ((n, a), (m, s)) in amax.iter().zip(&c.scales) {
            assert_eq!(n, m);
            assert_eq!(s.to_bits(), int8_scale(*a).to_bits());
        }
        assert!(parse_trt_cache("", "t").is_err());
        assert!(parse_trt_cache("TRT-x-Y\n", "t").is_err());
        let e = parse_trt_cache("TRT-1-Y\nx: 12\n", "t").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        Ok(())
    }

    #[test]
    fn flatbuffers_table_reads_back_sorted_with_amax_text() -> Result<()> {
        let amax = vec![
            ("b".to_string(), 2.5f32),
            ("a".to_string(), 0.1),
            ("c".to_string(), 0.0),
        ];
        let bytes = ort_trt_table(&amax)?;
        let kv = read_ort_trt_table(&bytes, "test")?;
        assert_eq!(
            kv,
            vec![
                ("a".to_string(), "0.1".to_string()),
                ("b".to_string(), "2.5".to_string()),
                ("c".to_string(), "0.0".to_string())
            ]
        );
        for (k, v) in &kv {
            let want = amax.iter().find(|(n, _)| n == k).map(|(_, a)| *a);
            assert_eq!(v.parse::<f32>().ok(), want);
        }
        assert!(read_ort_trt_table(&bytes[..bytes.len() / 2], "t").is_err());
        assert!(ort_trt_table(&[("x".into(), 1.0), ("x".into(), 2.0)]).is_err());
        Ok(())
    }
}
