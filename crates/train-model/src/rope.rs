//! Rotary position embeddings, computed exactly as `transformers` computes them.
//!
//! The inverse frequencies are computed in `f32` (as `transformers` does, with autocast off),
//! then turned into `cos` / `sin` tables per token position on the device. Llama and Qwen use the
//! "rotate half" layout: channel `i` is paired with channel `i + head_dim / 2`.

use std::f64::consts::PI;

use burn::tensor::{Int, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the base frequencies are rescaled for long contexts (`rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// No rescaling.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent rescaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelength threshold (in units of the original context) of the low band.
        low_freq_factor: f64,
        /// Wavelength threshold of the high band.
        high_freq_factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
    },
    /// YaRN (NTK-by-parts interpolation with an attention temperature).
    Yarn {
        /// Context extension factor.
        factor: f64,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
        /// Explicit scale of cos/sin; derived from `factor` (and `mscale`s) when absent.
        attention_factor: Option<f64>,
        /// Rotations above which dimensions are extrapolated.
        beta_fast: f64,
        /// Rotations below which dimensions are interpolated.
        beta_slow: f64,
        /// DeepSeek-style numerator of the attention factor.
        mscale: Option<f64>,
        /// DeepSeek-style denominator of the attention factor.
        mscale_all_dim: Option<f64>,
        /// Round the correction range to whole dimensions.
        truncate: bool,
    },
    /// LongRoPE (Phi-3): the frequencies divided per dimension by `short_factor`, or by
    /// `long_factor` in a forward whose largest position reaches beyond
    /// `original_max_position_embeddings` (as `transformers` switches them per forward), and
    /// cos/sin scaled by `attention_factor`.
    #[serde(rename = "longrope")]
    LongRope {
        /// Divisors of each frequency for sequences within the original context.
        short_factor: Vec<f64>,
        /// Divisors for longer sequences.
        long_factor: Vec<f64>,
        /// Context length of pre-training.
        original_max_position_embeddings: f64,
        /// The scale of cos/sin (resolved: explicit, or derived from the extension factor).
        attention_factor: f64,
    },
}

impl RopeScaling {
    /// The `rope_scaling` object of a 4.x-style `config.json` (null for [`RopeScaling::Default`]).
    pub fn to_hf_json(&self) -> Value {
        match self {
            Self::Default => Value::Null,
            Self::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
            Self::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let mut v = serde_json::json!({
                    "rope_type": "yarn", "factor": factor,
                    "original_max_position_embeddings": *original_max_position_embeddings as u64,
                    "beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate,
                });
                if let Value::Object(m) = &mut v {
                    for (k, val) in [
                        ("attention_factor", attention_factor),
                        ("mscale", mscale),
                        ("mscale_all_dim", mscale_all_dim),
                    ] {
                        if let Some(x) = val {
                            m.insert(k.into(), Value::from(*x));
                        }
                    }
                }
                v
            }
            Self::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => serde_json::json!({
                "rope_type": "longrope", "short_factor": short_factor, "long_factor": long_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
                "attention_factor": attention_factor,
            }),
        }
    }
}

/// Rotary embedding parameters of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// The base (`rope_theta`).
    pub theta: f64,
    /// Rotated channels per head: the head's width, or the part of it a partial rotary
    /// embedding covers (Phi-4-mini: `partial_rotary_factor` 0.75); the others pass through.
    pub head_dim: usize,
    /// Long-context rescaling.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} = {v} must be a positive number"))
            }
        };
        match &self.scaling {
            RopeScaling::Default => Ok(()),
            RopeScaling::Linear { factor } => positive("factor", *factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", *factor)?;
                positive("low_freq_factor", *low_freq_factor)?;
                positive("high_freq_factor", *high_freq_factor)?;
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                )?;
                if high_freq_factor <= low_freq_factor {
                    return Err("high_freq_factor must be greater than low_freq_factor".into());
                }
                Ok(())
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                ..
            } => {
                positive("factor", *factor)?;
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                )?;
                positive("beta_fast", *beta_fast)?;
                positive("beta_slow", *beta_slow)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                positive(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                )?;
                positive("attention_factor", *attention_factor)?;
                for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if f.len() != self.head_dim / 2 {
                        return Err(format!(
                            "{name} has {} entries; the rotary embedding has {} frequencies",
                            f.len(),
                            self.head_dim / 2
                        ));
                    }
                    if let Some(bad) = f.iter().find(|x| !(**x > 0.0 && x.is_finite())) {
                        return Err(format!(
                            "{name} holds {bad}; each must be a positive number"
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// `theta ** (2i / dim)` for i in 0..dim/2, in f32 as torch computes it.
    fn pos_freqs(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.theta as f32;
        (0..dim)
            .step_by(2)
            .map(|i| base.powf(i as f32 / dim as f32))
            .collect()
    }

    /// The inverse frequencies (length `head_dim / 2`) and the scale applied to cos/sin, for
    /// sequences within the original context.
    pub fn inv_freq(&self) -> (Vec<f32>, f32) {
        self.inv_freq_for(0)
    }

    /// [`RopeConfig::inv_freq`] for a forward whose positions go up to `seq_len - 1` (only
    /// LongRoPE depends on it).
    pub fn inv_freq_for(&self, seq_len: usize) -> (Vec<f32>, f32) {
        let default: Vec<f32> = self.pos_freqs().iter().map(|p| 1.0 / p).collect();
        match &self.scaling {
            RopeScaling::Default => (default, 1.0),
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                (default.iter().map(|x| x / f).collect(), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let factor = *factor as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let out = default
                    .iter()
                    .map(|&inv| {
                        let wavelen = (2.0 * PI) as f32 / inv;
                        let w = f64::from(wavelen);
                        let scaled = if w > low_wavelen { inv / factor } else { inv };
                        let medium = w >= high_wavelen && w <= low_wavelen;
                        if medium {
                            let smooth = ((*old as f32 / wavelen) - *low_freq_factor as f32)
                                / (*high_freq_factor as f32 - *low_freq_factor as f32);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect();
                (out, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let dim = self.head_dim as f64;
                let base = self.theta;
                let correction_dim = |rotations: f64| {
                    (dim * (original_max_position_embeddings / (rotations * 2.0 * PI)).ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim - 1.0);
                if (low - high).abs() < f64::EPSILON {
                    high += 0.001;
                }
                let pos = self.pos_freqs();
                let out = pos
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let extrapolation = 1.0 / p;
                        let interpolation = 1.0 / (*factor as f32 * p);
                        let ramp =
                            ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
                        let extra_factor = 1.0 - ramp;
                        interpolation * (1.0 - extra_factor) + extrapolation * extra_factor
                    })
                    .collect();
                (out, attention as f32)
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                // `1 / (ext * base^(i / dim))` in f32, the factors rounded to f32 first.
                let ext = if seq_len as f64 > *original_max_position_embeddings {
                    long_factor
                } else {
                    short_factor
                };
                let out = self
                    .pos_freqs()
                    .iter()
                    .zip(ext)
                    .map(|(&p, &e)| 1.0 / (e as f32 * p))
                    .collect();
                (out, *attention_factor as f32)
            }
        }
    }

    /// Whether the frequencies depend on the forward's largest position (LongRoPE).
    pub fn depends_on_length(&self) -> bool {
        matches!(self.scaling, RopeScaling::LongRope { .. })
    }

    /// The length beyond which the frequencies change (LongRoPE's pre-training context).
    pub fn switch_length(&self) -> Option<usize> {
        match self.scaling {
            RopeScaling::LongRope {
                original_max_position_embeddings,
                ..
            } => Some(original_max_position_embeddings as usize),
            _ => None,
        }
    }
}

/// Device-resident rotary tables: the inverse frequencies, ready to be combined with positions.
#[derive(Debug, Clone)]
pub(crate) struct Rotary<B: Backend> {
    inv_freq: Tensor<B, 1>,
    scale: f32,
}

impl<B: Backend> Rotary<B> {
    /// Uploads the inverse frequencies of `config` for positions below `seq_len`.
    pub fn new(config: &RopeConfig, seq_len: usize, device: &B::Device) -> Self {
        let (inv, scale) = config.inv_freq_for(seq_len);
        let n = inv.len();
        let inv_freq = Tensor::from_data(
            burn::tensor::TensorData::new(inv, [n]),
            (device, burn::tensor::DType::F32),
        );
        Self { inv_freq, scale }
    }

    /// `cos` and `sin` of shape `[batch, 1, seq, head_dim]` (f32) for the given position ids.
    pub fn cos_sin(&self, positions: Tensor<B, 2, Int>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, s] = positions.dims();
        let half = self.inv_freq.dims()[0];
        let pos = positions
            .float()
            .cast(burn::tensor::FloatDType::F32)
            .reshape([b, s, 1]);
        let freqs = pos * self.inv_freq.clone().reshape([1, 1, half]);
        let emb = Tensor::cat(vec![freqs.clone(), freqs], 2);
        let mut cos = emb.clone().cos();
        let mut sin = emb.sin();
        if (self.scale - 1.0).abs() > f32::EPSILON {
            cos = cos * self.scale;
            sin = sin * self.scale;
        }
        (cos.unsqueeze_dim(1), sin.unsqueeze_dim(1))
    }
}

/// Applies rotary embeddings to `x` of shape `[batch, heads, seq, head_dim]` (rotate-half layout).
///
/// `cos` / `sin` are the rotary tables of the positions (the model computes them per
/// forward) and are cast to `x`'s dtype first, as `transformers` does.
pub fn apply_rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let dtype = x.dtype();
    let cos = cos.clone().cast(dtype);
    let sin = sin.clone().cast(dtype);
    let x1 = x.clone().narrow(3, 0, d / 2);
    let x2 = x.clone().narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_follow_the_formula() {
        let r = RopeConfig {
            theta: 10_000.0,
            head_dim: 8,
            scaling: RopeScaling::Default,
        };
        let (inv, s) = r.inv_freq();
        assert_eq!(s, 1.0);
        let expect = [1.0, 0.1, 0.01, 0.001];
        for (a, b) in inv.iter().zip(expect) {
            assert!((a - b).abs() / b < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn linear_divides_every_frequency() {
        let d = RopeConfig {
            theta: 500.0,
            head_dim: 16,
            scaling: RopeScaling::Default,
        }
        .inv_freq()
        .0;
        let l = RopeConfig {
            theta: 500.0,
            head_dim: 16,
            scaling: RopeScaling::Linear { factor: 4.0 },
        }
        .inv_freq()
        .0;
        for (a, b) in d.iter().zip(&l) {
            assert!((a / 4.0 - b).abs() < 1e-9);
        }
    }

    #[test]
    fn llama3_keeps_high_and_divides_low_frequencies() {
        let cfg = RopeConfig {
            theta: 500_000.0,
            head_dim: 128,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let d = RopeConfig {
            scaling: RopeScaling::Default,
            ..cfg.clone()
        }
        .inv_freq()
        .0;
        let l = cfg.inv_freq().0;
        assert_eq!(d[0], l[0]);
        assert!((d[63] / 8.0 - l[63]).abs() < 1e-12);
    }
}
