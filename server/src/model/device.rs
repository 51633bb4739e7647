//! Where the model's weights live and its matmuls run: the CPU, or one CUDA GPU in a build
//! with the `cuda` feature (`--device cuda:0`).
//!
//! On a GPU the linear layers' weights are held there as bf16 (dequantised from GGUF blocks,
//! or cast from the HF files' values) and every projection and the LM head run there; what
//! else runs where is said in ARCHITECTURE.md ("The GPU build").

use std::{fmt, str::FromStr};

use candle_core::{DType, Device};

use super::ModelError;

/// A device as the flag names it: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("device {s:?}: expected `cpu`, `cuda` or `cuda:N` (N a GPU ordinal)");
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device: a build without the `cuda` feature refuses a GPU, saying so.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(n: usize) -> Result<Device, ModelError> {
    Device::new_cuda(n).map_err(|e| ModelError::Io(format!("cannot open GPU cuda:{n}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(n: usize) -> Result<Device, ModelError> {
    Err(ModelError::Io(format!(
        "device cuda:{n}: this graftd was built without the `cuda` feature \
         (build with `make build-cuda`)"
    )))
}

/// The dtype a device holds the frozen linear weights in: f32 on the CPU (whose serving
/// path streams GGUF blocks anyway), bf16 on a GPU (its tensor cores' input).
pub fn weight_dtype(dev: &Device) -> DType {
    if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag_forms_and_names_a_bad_one() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<DeviceSpec>().expect_err("refused");
            assert!(e.contains("cuda:N"), "{bad}: {e}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_refuses_a_gpu_and_says_why() {
        let e = DeviceSpec::Cuda(0).open().expect_err("refused").to_string();
        assert!(e.contains("without the `cuda` feature"), "{e}");
        assert!(DeviceSpec::Cpu.open().expect("cpu").is_cpu());
    }
}
