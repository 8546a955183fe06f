//! Running statistics of a run: smoothed throughput, the loss window's variance and trend.

use std::collections::VecDeque;

/// An exponential moving average.
#[derive(Debug, Clone, Copy)]
pub struct Ema {
    alpha: f64,
    value: Option<f64>,
}

impl Ema {
    /// `alpha` in (0, 1]: the weight of the newest value.
    pub fn new(alpha: f64) -> Self {
        Self {
            alpha: alpha.clamp(f64::MIN_POSITIVE, 1.0),
            value: None,
        }
    }

    /// Adds a value (non-finite values are ignored) and returns the average.
    pub fn push(&mut self, x: f64) -> Option<f64> {
        if x.is_finite() {
            self.value = Some(match self.value {
                Some(v) => v + self.alpha * (x - v),
                None => x,
            });
        }
        self.value
    }

    /// The current average.
    pub fn value(&self) -> Option<f64> {
        self.value
    }
}

/// The last `capacity` losses: mean, trend (least-squares slope per step) and the variance of
/// the residuals around that trend (so a steadily falling loss is not "noisy").
#[derive(Debug, Clone)]
pub struct LossWindow {
    capacity: usize,
    values: VecDeque<(f64, f64)>,
}

impl LossWindow {
    /// Keeps the last `capacity` (≥ 2) losses.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(2),
            values: VecDeque::new(),
        }
    }

    /// Adds the loss of `step` (non-finite losses are ignored).
    pub fn push(&mut self, step: usize, loss: f64) {
        if !loss.is_finite() {
            return;
        }
        if self.values.len() == self.capacity {
            self.values.pop_front();
        }
        self.values.push_back((step as f64, loss));
    }

    /// Number of losses held.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Mean loss of the window.
    pub fn mean(&self) -> Option<f64> {
        (!self.values.is_empty())
            .then(|| self.values.iter().map(|v| v.1).sum::<f64>() / self.values.len() as f64)
    }

    fn fit(&self) -> Option<(f64, f64)> {
        let n = self.values.len();
        if n < 2 {
            return None;
        }
        let nf = n as f64;
        let mx = self.values.iter().map(|v| v.0).sum::<f64>() / nf;
        let my = self.values.iter().map(|v| v.1).sum::<f64>() / nf;
        let sxx: f64 = self.values.iter().map(|v| (v.0 - mx).powi(2)).sum();
        let sxy: f64 = self.values.iter().map(|v| (v.0 - mx) * (v.1 - my)).sum();
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        Some((slope, my - slope * mx))
    }

    /// Least-squares slope of loss per step (negative: falling).
    pub fn trend(&self) -> Option<f64> {
        self.fit().map(|(slope, _)| slope)
    }

    /// Variance of the losses around their linear trend (needs 3 losses).
    pub fn variance(&self) -> Option<f64> {
        let (slope, intercept) = self.fit()?;
        let n = self.values.len();
        if n < 3 {
            return None;
        }
        let ss: f64 = self
            .values
            .iter()
            .map(|&(x, y)| (y - (slope * x + intercept)).powi(2))
            .sum();
        Some(ss / (n - 2) as f64)
    }
}
