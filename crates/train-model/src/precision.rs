//! Compute precision: which float type the weights and activations use.

use std::str::FromStr;

use burn::tensor::{DType, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The precision a model computes in (the seed's `ModelConfig.precision`).
///
/// Norms, softmax and the loss always run in `f32` whatever is chosen, as `transformers` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// `bf16` on a GPU backend that supports it, `fp32` everywhere else (on CPU, bf16 saves
    /// memory but not time, and costs accuracy).
    #[default]
    Auto,
    /// 32-bit floats.
    Fp32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    Fp16,
}

impl FromStr for Precision {
    type Err = ModelError;

    /// Parses `auto | fp32 | bf16 | fp16`; anything else is an error (the original silently fell
    /// back to bf16).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "fp32" | "f32" | "float32" => Ok(Self::Fp32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "fp16" | "f16" | "float16" => Ok(Self::Fp16),
            other => Err(ModelError::UnsupportedPrecision {
                precision: other.to_string(),
                backend: "any".to_string(),
                hint: "expected one of auto, fp32, bf16, fp16".to_string(),
            }),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Fp32 => "fp32",
            Self::Bf16 => "bf16",
            Self::Fp16 => "fp16",
        })
    }
}

/// True for the backends that run on an accelerator (where `auto` picks bf16).
pub(crate) fn is_accelerator<B: Backend>(device: &B::Device) -> bool {
    let name = B::name(device).to_ascii_lowercase();
    ["cuda", "rocm", "hip", "metal", "wgpu", "vulkan"]
        .iter()
        .any(|k| name.contains(k))
}

impl Precision {
    /// The float type to compute in on `device`, or an error when the backend cannot do it.
    pub fn resolve<B: Backend>(self, device: &B::Device) -> Result<DType> {
        let dtype = match self {
            Self::Auto => {
                if is_accelerator::<B>(device) && B::supports_dtype(device, DType::BF16) {
                    DType::BF16
                } else {
                    DType::F32
                }
            }
            Self::Fp32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::Fp16 => DType::F16,
        };
        if !B::supports_dtype(device, dtype) {
            return Err(ModelError::UnsupportedPrecision {
                precision: self.to_string(),
                backend: B::name(device),
                hint: "it computes in fp32 (auto chooses it)".to_string(),
            });
        }
        Ok(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names_and_rejects_others() {
        assert_eq!("BF16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("fp32".parse::<Precision>().unwrap(), Precision::Fp32);
        assert_eq!("auto".parse::<Precision>().unwrap(), Precision::Auto);
        let e = "int4".parse::<Precision>().unwrap_err().to_string();
        assert!(
            e.contains("int4") && e.contains("auto, fp32, bf16, fp16"),
            "{e}"
        );
    }
}
