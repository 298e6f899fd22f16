//! The `--device` of every tool that runs a candle model: `cpu`, `cuda` (GPU 0) or `cuda:N`.
//!
//! [`DeviceChoice`] is what a command line or a run's saved settings hold; [`DeviceChoice::open`]
//! gives candle's [`Device`]. A CUDA choice in a build without the `cuda` feature is an
//! [`Error::CudaNotCompiled`] naming the feature and the build command; in a build with it, a
//! GPU that is not there is an [`Error::NoCudaDevice`] wrapping candle's error.

use candle_core::Device;

use crate::error::{Error, Result};

/// The accepted spellings of [`DeviceChoice`].
pub const DEVICE_CHOICES: &str = "cpu, cuda or cuda:N";

/// The build command named when CUDA is asked of a build without it.
pub const CUDA_BUILD_COMMAND: &str =
    "cargo build --release --features cuda -p steper-train -p steper-export";

/// Where a candle model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU (the fused f32 kernels of [`crate::ops`] and [`crate::attention`]).
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal (candle's own kernels).
    Cuda(usize),
}

impl DeviceChoice {
    /// Opens the device: [`Device::Cpu`], or the CUDA GPU (see the module documentation for the
    /// errors).
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(ordinal) => open_cuda(ordinal),
        }
    }

    /// Whether this is the CPU.
    pub fn is_cpu(self) -> bool {
        self == DeviceChoice::Cpu
    }

    /// The choice that names `device` (`cpu` for the CPU, `cuda:N` for a CUDA GPU; a Metal
    /// device, which no tool opens, reads as the CPU).
    pub fn of(device: &Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => DeviceChoice::Cuda(gpu_id),
            _ => DeviceChoice::Cpu,
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|source| Error::NoCudaDevice {
        ordinal,
        source: Box::new(source),
    })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::CudaNotCompiled {
        device: DeviceChoice::Cuda(ordinal).to_string(),
    })
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || Error::Config {
            path: "--device".into(),
            field: "device".into(),
            expected: DEVICE_CHOICES.into(),
            got: format!("{s:?}"),
        };
        match t.as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            _ => {
                let n = t.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse::<usize>()
                    .map(DeviceChoice::Cuda)
                    .map_err(|_| bad())
            }
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_round_trips_choices() -> Result<()> {
        assert_eq!("cpu".parse::<DeviceChoice>()?, DeviceChoice::Cpu);
        assert_eq!("CUDA".parse::<DeviceChoice>()?, DeviceChoice::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceChoice>()?, DeviceChoice::Cuda(3));
        assert_eq!(DeviceChoice::Cuda(1).to_string(), "cuda:1");
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceChoice>().err().map(|e| e.to_string());
            assert!(
                e.as_ref()
                    .is_some_and(|e| e.contains(DEVICE_CHOICES) && e.contains("--device")),
                "{bad:?}: {e:?}"
            );
        }
        let json = serde_json::to_string(&DeviceChoice::Cuda(2)).map_err(|e| Error::Json {
            path: "<memory>".into(),
            message: e.to_string(),
        })?;
        assert_eq!(json, "\"cuda:2\"");
        let back: DeviceChoice = serde_json::from_str(&json).map_err(|e| Error::Json {
            path: "<memory>".into(),
            message: e.to_string(),
        })?;
        assert_eq!(back, DeviceChoice::Cuda(2));
        assert_eq!(DeviceChoice::of(&Device::Cpu), DeviceChoice::Cpu);
        assert!(DeviceChoice::Cpu.open()?.is_cpu());
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_build_without_the_feature_names_the_feature_and_the_build() {
        let e = DeviceChoice::Cuda(0).open().err().map(|e| e.to_string());
        assert!(
            e.as_ref().is_some_and(|e| e.contains("`cuda` feature")
                && e.contains(CUDA_BUILD_COMMAND)
                && e.contains("cuda:0")),
            "{e:?}"
        );
    }
}
