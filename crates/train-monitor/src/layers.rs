//! The layer monitor: per transformer layer, the weight norm, its change since the last snapshot
//! (absolute and relative), and the mean and standard deviation of the last 10 changes.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One layer at one snapshot (a row of `layer_history.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// Step of the snapshot.
    pub step: usize,
    /// Layer index (`model.layers.N`).
    pub layer: usize,
    /// L2 norm of all the layer's parameters.
    pub norm: f64,
    /// Norm minus the previous snapshot's (0 at the first).
    pub change: f64,
    /// `change` relative to the previous norm.
    pub relative_change: f64,
    /// Mean of the last 10 changes.
    pub mean_change: f64,
    /// Standard deviation of the last 10 changes.
    pub std_change: f64,
}

/// Keeps each layer's last norm and last 10 changes.
#[derive(Debug, Clone, Default)]
pub struct LayerMonitor {
    last: Vec<Option<f64>>,
    changes: Vec<VecDeque<f64>>,
}

impl LayerMonitor {
    /// An empty monitor.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a snapshot of every layer's norm.
    pub fn record(&mut self, step: usize, norms: &[f64]) -> Vec<LayerRecord> {
        if self.last.len() < norms.len() {
            self.last.resize(norms.len(), None);
            self.changes.resize(norms.len(), VecDeque::new());
        }
        norms
            .iter()
            .enumerate()
            .map(|(layer, &norm)| {
                let change = self.last[layer].map_or(0.0, |p| norm - p);
                let relative_change = match self.last[layer] {
                    Some(p) if p != 0.0 => change / p,
                    _ => 0.0,
                };
                if self.last[layer].is_some() {
                    let c = &mut self.changes[layer];
                    if c.len() == 10 {
                        c.pop_front();
                    }
                    c.push_back(change);
                }
                self.last[layer] = Some(norm);
                let c = &self.changes[layer];
                let n = c.len().max(1) as f64;
                let mean_change = c.iter().sum::<f64>() / n;
                let std_change =
                    (c.iter().map(|x| (x - mean_change).powi(2)).sum::<f64>() / n).sqrt();
                LayerRecord {
                    step,
                    layer,
                    norm,
                    change,
                    relative_change,
                    mean_change,
                    std_change,
                }
            })
            .collect()
    }
}
