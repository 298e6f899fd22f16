//! Weight dtypes: what a checkpoint stores, what a device computes in, and the `--dtype` choice
//! of the tools that load a model.
//!
//! The model computes in the dtype its weights are held in. On the CPU, `f32` runs the fused
//! kernels of [`crate::ops`] and [`crate::attention`]; `bf16` and `f16` run the composed forms
//! (candle's CPU matmul, softmax and elementwise kernels exist for both half types), which are
//! correct but several times slower than `f32` and unsuited to training. `auto` therefore keeps
//! the stored dtype only on devices whose fused kernels take it (none of the half types on the
//! CPU today) and otherwise computes in `f32`; an explicit `bf16` / `f16` is honoured wherever
//! candle computes it.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// The `--dtype` of a tool that loads a candle model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeChoice {
    /// The stored dtype where the device runs it at full speed, else `f32`.
    #[default]
    Auto,
    /// 32-bit floats.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half precision.
    F16,
}

/// The accepted spellings of [`DTypeChoice`].
pub const DTYPE_CHOICES: &str = "auto, f32, bf16 or f16";

impl std::str::FromStr for DTypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DTypeChoice::Auto),
            "f32" | "float32" | "fp32" => Ok(DTypeChoice::F32),
            "bf16" | "bfloat16" => Ok(DTypeChoice::BF16),
            "f16" | "float16" | "fp16" | "half" => Ok(DTypeChoice::F16),
            _ => Err(Error::Config {
                path: "--dtype".into(),
                field: "dtype".into(),
                expected: DTYPE_CHOICES.into(),
                got: format!("{s:?}"),
            }),
        }
    }
}

impl std::fmt::Display for DTypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DTypeChoice::Auto => "auto",
            DTypeChoice::F32 => "f32",
            DTypeChoice::BF16 => "bf16",
            DTypeChoice::F16 => "f16",
        })
    }
}

/// How a device's name reads in messages (`cpu`, `cuda:0`, `metal:0`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The name HF writes in `config.json`'s `torch_dtype` for `dtype`.
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Whether the model can compute in `dtype` on `device` at all (composed kernels included).
pub fn device_computes(device: &Device, dtype: DType) -> bool {
    match dtype {
        DType::F32 => true,
        DType::BF16 | DType::F16 => device.is_cpu() || device.is_cuda(),
        _ => false,
    }
}

/// Whether the device runs the model's fused kernels in `dtype` (only `f32` on the CPU; on a
/// GPU every kernel is candle's own, so each dtype it computes counts).
pub fn device_prefers(device: &Device, dtype: DType) -> bool {
    if device.is_cpu() {
        dtype == DType::F32
    } else {
        device_computes(device, dtype)
    }
}

/// The dtype to compute in for a checkpoint stored as `stored`, and a note when `auto` had to
/// convert (for the tool to print). An explicit dtype the device cannot compute is an
/// [`Error::UnsupportedDType`] naming both.
pub fn resolve(
    choice: DTypeChoice,
    stored: DType,
    device: &Device,
) -> Result<(DType, Option<String>)> {
    let wanted = match choice {
        DTypeChoice::Auto => {
            if device_prefers(device, stored) {
                return Ok((stored, None));
            }
            return Ok((
                DType::F32,
                Some(format!(
                    "weights stored as {}; computing in f32 on {} (its fused kernels are f32; \
                     --dtype {} keeps them, slower)",
                    dtype_name(stored),
                    device_name(device),
                    dtype_name(stored)
                )),
            ));
        }
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::BF16 => DType::BF16,
        DTypeChoice::F16 => DType::F16,
    };
    if !device_computes(device, wanted) {
        return Err(Error::UnsupportedDType {
            dtype: dtype_name(wanted).into(),
            device: device_name(device),
        });
    }
    Ok((wanted, None))
}

/// The short name of a float dtype (`f32`, `bf16`, `f16`, ...).
pub fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_choices() -> Result<()> {
        assert_eq!("BF16".parse::<DTypeChoice>()?, DTypeChoice::BF16);
        assert_eq!("float16".parse::<DTypeChoice>()?, DTypeChoice::F16);
        assert_eq!(DTypeChoice::Auto.to_string(), "auto");
        let err = "int8".parse::<DTypeChoice>().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("int8") && e.contains(DTYPE_CHOICES)));
        Ok(())
    }

    #[test]
    fn auto_computes_in_f32_on_the_cpu_and_says_so() -> Result<()> {
        let (d, note) = resolve(DTypeChoice::Auto, DType::BF16, &Device::Cpu)?;
        assert_eq!(d, DType::F32);
        assert!(note.is_some_and(|n| n.contains("bf16") && n.contains("cpu")));
        assert_eq!(
            resolve(DTypeChoice::Auto, DType::F32, &Device::Cpu)?,
            (DType::F32, None)
        );
        assert_eq!(
            resolve(DTypeChoice::F16, DType::BF16, &Device::Cpu)?,
            (DType::F16, None)
        );
        Ok(())
    }
}
