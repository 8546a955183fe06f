//! Generations watched during training: live previews (every few steps, against the golden
//! answer) and the evolution tracker (a fixed probe set at steps 0, 10, 25, 50, 100, 250, …).

use serde::{Deserialize, Serialize};

/// One generated answer (a row of `previews.jsonl` or `evolution.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Step after which it was generated.
    pub step: usize,
    /// Which prompt (index in the preview or probe set).
    pub index: usize,
    /// The prompt's last user message (or the prompt text).
    pub prompt: String,
    /// The reference answer.
    pub golden: String,
    /// What the model generated (greedy, with the configured processors).
    pub generated: String,
    /// `generated` equals `golden` (both trimmed).
    pub exact_match: bool,
}

impl Sample {
    /// A sample, its exact match computed.
    pub fn new(
        step: usize,
        index: usize,
        prompt: String,
        golden: String,
        generated: String,
    ) -> Self {
        let exact_match = generated.trim() == golden.trim();
        Self {
            step,
            index,
            prompt,
            golden,
            generated,
            exact_match,
        }
    }
}

/// One sampled completion of online training (GRPO) and how it was scored: a row of
/// `completions.jsonl`, as TRL logs its completions table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSample {
    /// The optimizer step the completion was generated for.
    pub step: usize,
    /// Its index among the step's completions.
    pub index: usize,
    /// The prompt's last message.
    pub prompt: String,
    /// The generated text.
    pub completion: String,
    /// Each reward function's score (`null` where it did not apply), by function name.
    pub rewards: std::collections::BTreeMap<String, Option<f64>>,
    /// The weighted sum of the scores (`null` when no function applied).
    pub reward: Option<f64>,
    /// The advantage it was trained with.
    pub advantage: f64,
}

/// Steps between live previews: `max(10, eval_steps / 10)` (the origin's rule).
pub fn preview_interval(eval_steps: usize) -> usize {
    (eval_steps / 10).max(10)
}

/// Whether the evolution tracker looks at `step`: 0, 10, 25, 50, 100, 250, 500, 1000, 2500, …
pub fn evolution_due(step: usize) -> bool {
    if step == 0 {
        return true;
    }
    let mut base = 10usize;
    while base <= step {
        if step == base || step * 2 == base * 5 || step == base * 5 {
            return true;
        }
        match base.checked_mul(10) {
            Some(b) => base = b,
            None => break,
        }
    }
    false
}
