//! The standard processors, each with the semantics of its `transformers` counterpart
//! (`transformers/generation/logits_process.py`, 5.x); fixtures in `tests/fixtures` prove it.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{LogitsError, Result};
use crate::processor::{
    LogitsProcessor, RowContext, argsort_ascending, check_ids, check_row, log_softmax, softmax,
};

fn check_min_keep(name: &str, min_tokens_to_keep: usize) -> Result<()> {
    if min_tokens_to_keep == 0 {
        return Err(LogitsError::config(
            name,
            "`min_tokens_to_keep` must be at least 1",
        ));
    }
    Ok(())
}

/// Divides the logits by a temperature (`TemperatureLogitsWarper`).
#[derive(Debug, Clone)]
pub struct Temperature {
    temperature: f32,
}

impl Temperature {
    /// A strictly positive, finite temperature.
    pub fn new(temperature: f32) -> Result<Self> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(LogitsError::config(
                "temperature",
                format!(
                    "{temperature} must be a positive number (for greedy decoding give no temperature)"
                ),
            ));
        }
        Ok(Self { temperature })
    }
}

impl LogitsProcessor for Temperature {
    fn name(&self) -> &'static str {
        "temperature"
    }
    fn process(&mut self, _: usize, _: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        for x in logits.iter_mut() {
            *x /= self.temperature;
        }
        Ok(())
    }
}

/// Keeps the `k` highest logits, and every logit tied with the k-th (`TopKLogitsWarper`).
#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
}

impl TopK {
    /// Keeps `max(top_k, min_tokens_to_keep)` tokens.
    pub fn new(top_k: usize, min_tokens_to_keep: usize) -> Result<Self> {
        check_min_keep("top_k", min_tokens_to_keep)?;
        if top_k == 0 {
            return Err(LogitsError::config("top_k", "`top_k` must be at least 1"));
        }
        Ok(Self {
            k: top_k.max(min_tokens_to_keep),
        })
    }
}

impl LogitsProcessor for TopK {
    fn name(&self) -> &'static str {
        "top_k"
    }
    fn process(&mut self, _: usize, _: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        let k = self.k.min(logits.len());
        let mut sorted = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[k - 1];
        for x in logits.iter_mut() {
            if *x < threshold {
                *x = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
}

/// Nucleus filtering (`TopPLogitsWarper`): keeps the smallest set of most likely tokens whose
/// probability mass reaches `top_p`.
#[derive(Debug, Clone)]
pub struct TopP {
    top_p: f32,
    min_tokens_to_keep: usize,
}

impl TopP {
    /// `top_p` in `[0, 1]`.
    pub fn new(top_p: f32, min_tokens_to_keep: usize) -> Result<Self> {
        check_min_keep("top_p", min_tokens_to_keep)?;
        if !(0.0..=1.0).contains(&top_p) {
            return Err(LogitsError::config(
                "top_p",
                format!("{top_p} must be in [0, 1]"),
            ));
        }
        Ok(Self {
            top_p,
            min_tokens_to_keep,
        })
    }
}

impl LogitsProcessor for TopP {
    fn name(&self) -> &'static str {
        "top_p"
    }
    fn process(&mut self, _: usize, _: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        let order = argsort_ascending(logits);
        let sorted: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
        let probs = softmax(&sorted);
        let n = logits.len();
        let keep_from = n.saturating_sub(self.min_tokens_to_keep);
        let mut cum = 0.0f32;
        for (pos, (&i, p)) in order.iter().zip(probs).enumerate() {
            cum += p;
            if cum <= 1.0 - self.top_p && pos < keep_from {
                logits[i] = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
}

/// Min-p filtering (`MinPLogitsWarper`): removes tokens less likely than `min_p` times the most
/// likely one.
#[derive(Debug, Clone)]
pub struct MinP {
    min_p: f32,
    min_tokens_to_keep: usize,
}

impl MinP {
    /// `min_p` in `[0, 1]`.
    pub fn new(min_p: f32, min_tokens_to_keep: usize) -> Result<Self> {
        check_min_keep("min_p", min_tokens_to_keep)?;
        if !(0.0..=1.0).contains(&min_p) {
            return Err(LogitsError::config(
                "min_p",
                format!("{min_p} must be in [0, 1]"),
            ));
        }
        Ok(Self {
            min_p,
            min_tokens_to_keep,
        })
    }
}

impl LogitsProcessor for MinP {
    fn name(&self) -> &'static str {
        "min_p"
    }
    fn process(&mut self, _: usize, _: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        let probs = softmax(logits);
        let top = probs.iter().copied().fold(0.0f32, f32::max);
        let threshold = self.min_p * top;
        let mut order = argsort_ascending(&probs);
        order.reverse();
        let keep: BTreeSet<usize> = order
            .iter()
            .take(self.min_tokens_to_keep)
            .copied()
            .collect();
        for (i, p) in probs.iter().enumerate() {
            if *p < threshold && !keep.contains(&i) {
                logits[i] = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
}

/// Locally typical sampling (`TypicalLogitsWarper`).
#[derive(Debug, Clone)]
pub struct Typical {
    mass: f32,
    min_tokens_to_keep: usize,
}

impl Typical {
    /// `mass` in `(0, 1)`.
    pub fn new(mass: f32, min_tokens_to_keep: usize) -> Result<Self> {
        check_min_keep("typical", min_tokens_to_keep)?;
        if !(mass > 0.0 && mass < 1.0) {
            return Err(LogitsError::config(
                "typical",
                format!("`typical_p` {mass} must be in (0, 1)"),
            ));
        }
        Ok(Self {
            mass,
            min_tokens_to_keep,
        })
    }
}

impl LogitsProcessor for Typical {
    fn name(&self) -> &'static str {
        "typical"
    }
    fn process(&mut self, _: usize, _: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        let normalized = log_softmax(logits);
        let ent: f32 = -normalized
            .iter()
            .map(|&l| l * l.exp())
            .filter(|v| !v.is_nan())
            .sum::<f32>();
        let shifted: Vec<f32> = normalized.iter().map(|&l| (-l - ent).abs()).collect();
        let order = argsort_ascending(&shifted);
        let sorted_logits: Vec<f32> = order.iter().map(|&i| logits[i]).collect();
        let probs = softmax(&sorted_logits);
        let mut cum = 0.0f32;
        let mut below = 0usize;
        for p in probs {
            cum += p;
            if cum < self.mass {
                below += 1;
            }
        }
        let last = below.min(logits.len() - 1);
        let threshold = shifted[order[last]];
        for (pos, &i) in order.iter().enumerate() {
            if pos >= self.min_tokens_to_keep && shifted[i] > threshold {
                logits[i] = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
}

/// Repetition penalty (`RepetitionPenaltyLogitsProcessor`): every token already in the row
/// (prompt included) has its logit divided by `penalty` when positive, multiplied when negative.
#[derive(Debug, Clone)]
pub struct RepetitionPenalty {
    penalty: f32,
}

impl RepetitionPenalty {
    /// A strictly positive penalty (1 changes nothing).
    pub fn new(penalty: f32) -> Result<Self> {
        if !(penalty > 0.0 && penalty.is_finite()) {
            return Err(LogitsError::config(
                "repetition_penalty",
                format!("{penalty} must be a positive number"),
            ));
        }
        Ok(Self { penalty })
    }
}

impl LogitsProcessor for RepetitionPenalty {
    fn name(&self) -> &'static str {
        "repetition_penalty"
    }
    fn process(&mut self, _: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        let seen: BTreeSet<usize> = ctx
            .ids
            .iter()
            .map(|&t| t as usize)
            .filter(|&t| t < logits.len())
            .collect();
        for t in seen {
            let x = logits[t];
            logits[t] = if x < 0.0 {
                x * self.penalty
            } else {
                x / self.penalty
            };
        }
        Ok(())
    }
}

/// Bans every token that would repeat an n-gram already in the row
/// (`NoRepeatNGramLogitsProcessor`).
#[derive(Debug, Clone)]
pub struct NoRepeatNGram {
    n: usize,
}

impl NoRepeatNGram {
    /// `ngram_size` ≥ 1.
    pub fn new(ngram_size: usize) -> Result<Self> {
        if ngram_size == 0 {
            return Err(LogitsError::config(
                "no_repeat_ngram",
                "`ngram_size` must be at least 1",
            ));
        }
        Ok(Self { n: ngram_size })
    }

    /// The tokens banned after `ids`.
    pub fn banned(&self, ids: &[u32]) -> BTreeSet<u32> {
        let n = self.n;
        let len = ids.len();
        let mut banned = BTreeSet::new();
        if len < n {
            return banned;
        }
        let prefix = &ids[len + 1 - n..];
        for w in ids.windows(n) {
            if &w[..n - 1] == prefix {
                banned.insert(w[n - 1]);
            }
        }
        banned
    }
}

impl LogitsProcessor for NoRepeatNGram {
    fn name(&self) -> &'static str {
        "no_repeat_ngram"
    }
    fn process(&mut self, _: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        for t in self.banned(ctx.ids) {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
}

/// Forbids the end-of-sequence tokens until `min_new_tokens` were generated
/// (`MinNewTokensLengthLogitsProcessor`).
#[derive(Debug, Clone)]
pub struct MinNewTokens {
    min_new_tokens: usize,
    eos: Vec<u32>,
}

impl MinNewTokens {
    /// At least `min_new_tokens` before any of `eos_token_ids`.
    pub fn new(min_new_tokens: usize, eos_token_ids: Vec<u32>) -> Result<Self> {
        if eos_token_ids.is_empty() {
            return Err(LogitsError::config(
                "min_new_tokens",
                "no end-of-sequence token id to hold back",
            ));
        }
        Ok(Self {
            min_new_tokens,
            eos: eos_token_ids,
        })
    }
}

impl LogitsProcessor for MinNewTokens {
    fn name(&self) -> &'static str {
        "min_new_tokens"
    }
    fn process(&mut self, _: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        if ctx.generated().len() < self.min_new_tokens {
            for &t in &self.eos {
                if let Some(x) = logits.get_mut(t as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }
}

/// Sets the logits of chosen tokens to −∞ (`SuppressTokensLogitsProcessor`); ids outside the
/// vocabulary are ignored, as there.
#[derive(Debug, Clone)]
pub struct SuppressTokens {
    ids: Vec<u32>,
}

impl SuppressTokens {
    /// Suppresses `token_ids`.
    pub fn new(token_ids: Vec<u32>) -> Self {
        Self { ids: token_ids }
    }
}

impl LogitsProcessor for SuppressTokens {
    fn name(&self) -> &'static str {
        "suppress_tokens"
    }
    fn process(&mut self, _: usize, _: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        for &t in &self.ids {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
}

/// Adds a bias to the last token of a sequence when the row ends with the rest of it
/// (`SequenceBiasLogitsProcessor`); single-token sequences are always biased.
#[derive(Debug, Clone)]
pub struct SequenceBias {
    name: &'static str,
    biases: BTreeMap<Vec<u32>, f32>,
}

impl SequenceBias {
    /// `(sequence, bias)` pairs; a sequence given twice keeps its last bias.
    pub fn new(biases: Vec<(Vec<u32>, f32)>) -> Result<Self> {
        Self::named("sequence_bias", biases)
    }

    fn named(name: &'static str, biases: Vec<(Vec<u32>, f32)>) -> Result<Self> {
        if biases.is_empty() || biases.iter().any(|(s, _)| s.is_empty()) {
            return Err(LogitsError::config(
                name,
                "needs at least one non-empty token sequence",
            ));
        }
        if let Some((s, b)) = biases.iter().find(|(_, b)| b.is_nan()) {
            return Err(LogitsError::config(
                name,
                format!("bias {b} of {s:?} is not a number"),
            ));
        }
        Ok(Self {
            name,
            biases: biases.into_iter().collect(),
        })
    }
}

impl LogitsProcessor for SequenceBias {
    fn name(&self) -> &'static str {
        self.name
    }
    fn process(&mut self, _: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name, logits)?;
        let mut bias: BTreeMap<usize, f32> = BTreeMap::new();
        for (seq, &b) in &self.biases {
            check_ids(self.name, "a biased sequence", seq, logits.len())?;
            let (last, prefix) = seq.split_last().unwrap_or((&0, &[]));
            if prefix.len() > ctx.ids.len() || !ctx.ids.ends_with(prefix) {
                continue;
            }
            *bias.entry(*last as usize).or_insert(0.0) += b;
        }
        for (t, b) in bias {
            logits[t] += b;
        }
        Ok(())
    }
}

/// Never generates the given token sequences (`NoBadWordsLogitsProcessor`: a sequence bias of
/// −∞; a single-token "bad word" that is an end-of-sequence token is dropped, as there).
#[derive(Debug, Clone)]
pub struct BadWords(SequenceBias);

impl BadWords {
    /// Bans `sequences`.
    pub fn new(sequences: Vec<Vec<u32>>, eos_token_ids: &[u32]) -> Result<Self> {
        let kept: Vec<(Vec<u32>, f32)> = sequences
            .into_iter()
            .filter(|s| !(s.len() == 1 && eos_token_ids.contains(&s[0])))
            .map(|s| (s, f32::NEG_INFINITY))
            .collect();
        Ok(Self(SequenceBias::named("bad_words", kept)?))
    }
}

impl LogitsProcessor for BadWords {
    fn name(&self) -> &'static str {
        "bad_words"
    }
    fn process(&mut self, row: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        self.0.process(row, ctx, logits)
    }
}

/// Forces an end-of-sequence token when the row reaches `max_length - 1` tokens
/// (`ForcedEOSTokenLogitsProcessor`; `max_length` counts prompt and generated tokens).
#[derive(Debug, Clone)]
pub struct ForcedEos {
    max_length: usize,
    eos: Vec<u32>,
}

impl ForcedEos {
    /// Forces one of `eos_token_ids` as token number `max_length`.
    pub fn new(max_length: usize, eos_token_ids: Vec<u32>) -> Result<Self> {
        if eos_token_ids.is_empty() {
            return Err(LogitsError::config(
                "forced_eos",
                "no end-of-sequence token id to force",
            ));
        }
        Ok(Self {
            max_length,
            eos: eos_token_ids,
        })
    }
}

impl LogitsProcessor for ForcedEos {
    fn name(&self) -> &'static str {
        "forced_eos"
    }
    fn process(&mut self, _: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()> {
        check_row(self.name(), logits)?;
        check_ids(self.name(), "eos_token_ids", &self.eos, logits.len())?;
        if ctx.ids.len() + 1 == self.max_length {
            logits.fill(f32::NEG_INFINITY);
            for &t in &self.eos {
                logits[t as usize] = 0.0;
            }
        }
        Ok(())
    }
}
