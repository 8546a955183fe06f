//! Between optimizer steps: the layer monitor's norms, live previews against the golden answer
//! and the evolution tracker's probe predictions, all fed to `train-monitor`.

use std::time::Instant;

use burn::module::AutodiffModule;
use train_data::{ChatTokenizer, Example, IGNORE_INDEX};
use train_logits::{GenerationConfig, LogitsProcessor, generate};
use train_model::CausalLm;
use train_model::FusedAutodiffBackend;
use train_monitor::{MonitoringBundle, Sample, evolution_due};
use train_runner::layer_norms;

/// A prompt and its reference answer, cut from a prepared example.
#[derive(Debug, Clone)]
pub struct Probe {
    prompt: Vec<u32>,
    text: String,
    golden: String,
    golden_tokens: usize,
}

/// Up to `n` probes: each example's tokens up to its first trained token, and the first
/// trained span decoded as the golden answer.
pub fn probes(examples: &[Example], tok: &ChatTokenizer, n: usize) -> Vec<Probe> {
    let t = tok.tokenizer();
    examples
        .iter()
        .filter_map(|e| {
            // A row trained from its first token (a `text` row) has no prompt to preview.
            let first = e
                .labels
                .iter()
                .position(|&l| l != IGNORE_INDEX)
                .filter(|&f| f > 0)?;
            let end = e.labels[first..]
                .iter()
                .position(|&l| l == IGNORE_INDEX)
                .map_or(e.labels.len(), |k| first + k);
            let golden = t
                .decode(&e.input_ids[first..end], true)
                .ok()?
                .trim()
                .to_string();
            let text = t.decode(&e.input_ids[..first], true).ok()?;
            let chars: Vec<char> = text.trim().chars().collect();
            let text: String = chars[chars.len().saturating_sub(200)..].iter().collect();
            Some(Probe {
                prompt: e.input_ids[..first].to_vec(),
                text,
                golden,
                golden_tokens: end - first,
            })
        })
        .take(n)
        .collect()
}

/// Looks at the model between steps for the monitor (which calls it with its bundle).
pub struct Inspector<'a> {
    /// Decodes and templates.
    pub tok: &'a ChatTokenizer,
    /// Preview and probe prompts.
    pub probes: Vec<Probe>,
    /// Processors applied while generating previews.
    pub processors: Vec<Box<dyn LogitsProcessor>>,
    /// Ids that end an answer.
    pub end_ids: Vec<u32>,
    /// Steps between previews and layer snapshots.
    pub interval: usize,
    /// Longest preview.
    pub max_new_tokens: usize,
    /// The first step this run did (previews and snapshots start there).
    pub first_step: usize,
    warned: bool,
}

impl<'a> Inspector<'a> {
    /// An inspector; `interval` steps between previews and layer snapshots.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tok: &'a ChatTokenizer,
        probes: Vec<Probe>,
        processors: Vec<Box<dyn LogitsProcessor>>,
        end_ids: Vec<u32>,
        interval: usize,
        max_new_tokens: usize,
        first_step: usize,
    ) -> Self {
        Self {
            tok,
            probes,
            processors,
            end_ids,
            interval: interval.max(1),
            max_new_tokens,
            first_step,
            warned: false,
        }
    }

    fn warn(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if !self.warned {
            errln!("warning: monitoring ({what}): {e} (training goes on)");
            self.warned = true;
        }
    }
}

impl Inspector<'_> {
    /// Looks at `model` after `step` optimizer steps, feeding `bundle`.
    pub fn inspect<B: FusedAutodiffBackend>(
        &mut self,
        step: usize,
        model: &CausalLm<B>,
        bundle: &mut MonitoringBundle,
    ) {
        let (wants_layers, wants_evolution) = (bundle.wants_layers(), bundle.wants_evolution());
        let on_interval = step == self.first_step || step.is_multiple_of(self.interval);
        let preview =
            step > self.first_step && step.is_multiple_of(self.interval) && !self.probes.is_empty();
        let evolution = wants_evolution && evolution_due(step) && !self.probes.is_empty();
        let layers = wants_layers && on_interval;
        if !(preview || evolution || layers) {
            return;
        }
        let started = Instant::now();
        let inner = model.valid();
        if layers {
            let norms = layer_norms(&inner);
            let r = bundle.layers(step, &norms);
            if let Err(e) = r {
                self.warn("layer monitor", &e);
            }
        }
        if preview || evolution {
            // One prompt at a time: without padding, the KV-cached decode is cheaper than the
            // padded batch (measured on the cpu backend). An answer longer than the golden one
            // by more than a few tokens cannot match it, so generation stops there.
            let out: Result<Vec<_>, _> = self
                .probes
                .iter()
                .map(|p| {
                    let config = GenerationConfig {
                        max_new_tokens: self.max_new_tokens.min(p.golden_tokens + 8),
                        stop_token_ids: self.end_ids.clone(),
                        pad_token_id: self.tok.pad_id(),
                        ..GenerationConfig::default()
                    };
                    generate(
                        &inner,
                        Some(self.tok.tokenizer()),
                        std::slice::from_ref(&p.prompt),
                        &mut self.processors,
                        &config,
                    )
                    .map(|mut g| g.remove(0))
                })
                .collect();
            match out {
                Ok(out) => {
                    let samples: Vec<Sample> = self
                        .probes
                        .iter()
                        .zip(out)
                        .enumerate()
                        .map(|(i, (p, g))| {
                            Sample::new(step, i, p.text.clone(), p.golden.clone(), g.text)
                        })
                        .collect();
                    let r1 = if preview {
                        bundle.previews(&samples)
                    } else {
                        Ok(())
                    };
                    let r2 = if evolution {
                        bundle.evolution(&samples)
                    } else {
                        Ok(())
                    };
                    if let Err(e) = r1.and(r2) {
                        self.warn("previews", &e);
                    }
                }
                Err(e) => self.warn("previews", &e),
            }
        }
        bundle.account(started.elapsed());
    }
}
