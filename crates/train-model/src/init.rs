//! Deterministic random initialisation (no dependency on a particular RNG crate's streams).

use burn::tensor::TensorData;

use crate::names::{ParamKind, TensorSpec};

/// A small seeded normal generator (SplitMix64 + Box–Muller): the same seed gives the same
/// weights on every platform and backend.
pub(crate) struct NormalRng {
    state: u64,
    spare: Option<f32>,
}

impl NormalRng {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn uniform(&mut self) -> f64 {
        // 53 random bits in (0, 1].
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub(crate) fn normal(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }

    /// Host data for one tensor: normal(0, std) matrices, zero biases, unit norms.
    pub(crate) fn init(&mut self, spec: &TensorSpec, std: f32) -> TensorData {
        let n: usize = spec.shape.iter().product();
        let values: Vec<f32> = match spec.kind {
            ParamKind::Matrix => (0..n).map(|_| self.normal() * std).collect(),
            ParamKind::Bias => vec![0.0; n],
            ParamKind::Norm => vec![1.0; n],
        };
        TensorData::new(values, spec.shape.clone())
    }
}
