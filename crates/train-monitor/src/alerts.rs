//! Alerts: throughput below its baseline, validation loss drifting above training loss, a noisy
//! loss, low host memory, a NaN loss. Thresholds are configurable.

use serde::{Deserialize, Serialize};

/// Thresholds (defaults from the origin).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AlertConfig {
    /// Alert when smoothed tokens/s falls below this fraction of the baseline (0.6).
    pub min_throughput_ratio: f64,
    /// Steps averaged into the throughput baseline, after the first (warm-up) step (5).
    pub baseline_steps: usize,
    /// Alert when validation loss exceeds the recent training loss by more than this (0.3).
    pub max_eval_gap: f64,
    /// Alert when the loss varies around its trend by more than this variance (1.0).
    pub max_loss_variance: f64,
    /// Alert when the machine has less memory available than this (512 MiB).
    pub min_available_bytes: u64,
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            min_throughput_ratio: 0.6,
            baseline_steps: 5,
            max_eval_gap: 0.3,
            max_loss_variance: 1.0,
            min_available_bytes: 512 << 20,
        }
    }
}

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertKind {
    /// Tokens/s fell below the configured fraction of the baseline.
    LowThroughput,
    /// Validation loss is well above training loss (over-fitting or a distribution shift).
    EvalGap,
    /// The loss is noisy around its trend.
    LossVariance,
    /// The machine is running out of memory.
    LowMemory,
    /// The loss is NaN or infinite.
    NanLoss,
}

/// One active alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// What it is about.
    pub kind: AlertKind,
    /// Step at which it was raised.
    pub step: usize,
    /// The measured value.
    pub value: f64,
    /// The threshold it crossed.
    pub threshold: f64,
    /// A sentence for people.
    pub message: String,
}

/// The measurements alerts are computed from.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlertInputs {
    /// Current step.
    pub step: usize,
    /// The step's loss.
    pub loss: f64,
    /// Smoothed tokens/s.
    pub tokens_per_sec: Option<f64>,
    /// Throughput baseline, once known.
    pub baseline_tokens_per_sec: Option<f64>,
    /// Latest validation loss minus recent training loss.
    pub eval_gap: Option<f64>,
    /// Detrended loss variance.
    pub loss_variance: Option<f64>,
    /// Host memory available.
    pub available_bytes: Option<u64>,
}

/// The alerts active for `inputs` under `config`.
pub fn evaluate(config: &AlertConfig, inputs: &AlertInputs) -> Vec<Alert> {
    let mut out = Vec::new();
    let step = inputs.step;
    if !inputs.loss.is_finite() {
        out.push(Alert {
            kind: AlertKind::NanLoss,
            step,
            value: inputs.loss,
            threshold: f64::NAN,
            message: format!("step {step}: the loss is {}", inputs.loss),
        });
    }
    if let (Some(tps), Some(base)) = (inputs.tokens_per_sec, inputs.baseline_tokens_per_sec) {
        let threshold = config.min_throughput_ratio * base;
        if base > 0.0 && tps < threshold {
            out.push(Alert {
                kind: AlertKind::LowThroughput,
                step,
                value: tps,
                threshold,
                message: format!(
                    "throughput {tps:.0} tokens/s is below {:.0} % of its baseline {base:.0}",
                    config.min_throughput_ratio * 100.0
                ),
            });
        }
    }
    if let Some(gap) = inputs.eval_gap
        && gap > config.max_eval_gap
    {
        out.push(Alert {
            kind: AlertKind::EvalGap,
            step,
            value: gap,
            threshold: config.max_eval_gap,
            message: format!(
                "validation loss is {gap:.3} above the training loss (limit {})",
                config.max_eval_gap
            ),
        });
    }
    if let Some(v) = inputs.loss_variance
        && v > config.max_loss_variance
    {
        out.push(Alert {
            kind: AlertKind::LossVariance,
            step,
            value: v,
            threshold: config.max_loss_variance,
            message: format!(
                "loss variance {v:.3} around its trend is above {}",
                config.max_loss_variance
            ),
        });
    }
    if let Some(avail) = inputs.available_bytes
        && avail < config.min_available_bytes
    {
        out.push(Alert {
            kind: AlertKind::LowMemory,
            step,
            value: avail as f64,
            threshold: config.min_available_bytes as f64,
            message: format!("only {} MiB of memory left on the machine", avail >> 20),
        });
    }
    out
}
