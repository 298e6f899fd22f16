//! INT8 calibration for STEPER exports. This crate starts with the TensorRT calibration cache
//! writer (DESIGN.md, "Calibration output"): a header line `TRT-<version>-<Calibrator>` and one
//! line per tensor `name: <8 hex digits of the IEEE-754 f32 scale = amax / 127>`. Range
//! collection, the ONNX Runtime flatbuffers table and the QDQ model are the next pieces.
#![warn(missing_docs)]

use std::fmt::Write;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor range that cannot be written (negative, NaN or infinite amax).
    #[error("tensor `{tensor}`: amax must be finite and >= 0, got {amax}")]
    BadRange {
        /// The tensor name.
        tensor: String,
        /// The offending value.
        amax: f32,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The INT8 scale TensorRT stores for a symmetric range: `amax / 127`.
pub fn int8_scale(amax: f32) -> f32 {
    amax / 127.0
}

/// The 8 hex digits (big-endian bit pattern, leading zeros kept) of an f32.
pub fn f32_hex(v: f32) -> String {
    format!("{:08x}", v.to_bits())
}

/// Renders a TensorRT calibration cache: `TRT-<trt_version>-<calibrator>` then one
/// `name: hex(scale)` line per tensor, in the order given.
pub fn trt_cache(trt_version: u32, calibrator: &str, amax: &[(String, f32)]) -> Result<String> {
    let mut s = format!("TRT-{trt_version}-{calibrator}\n");
    for (name, a) in amax {
        if !a.is_finite() || *a < 0.0 {
            return Err(Error::BadRange {
                tensor: name.clone(),
                amax: *a,
            });
        }
        // Writing to a String cannot fail.
        let _ = writeln!(s, "{name}: {}", f32_hex(int8_scale(*a)));
    }
    Ok(s)
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
        Ok(())
    }
}
