//! The [`LogitsProcessor`] trait, what a processor sees of a row, and shared helpers.

use crate::error::{LogitsError, Result};

/// What a processor sees of one batch row when the next token's logits are processed.
#[derive(Debug, Clone, Copy)]
pub struct RowContext<'a> {
    /// Prompt followed by the tokens generated so far (`transformers`' `input_ids` of the row,
    /// without left padding).
    pub ids: &'a [u32],
    /// How many of `ids` are the prompt.
    pub prompt_len: usize,
    /// The generated tokens decoded as text (special tokens included), as far as the generator
    /// decodes; empty when no tokenizer is involved.
    pub text: &'a str,
}

impl<'a> RowContext<'a> {
    /// A row without decoded text: `ids` are the prompt and the generated tokens.
    pub fn new(ids: &'a [u32], prompt_len: usize) -> Self {
        Self {
            ids,
            prompt_len: prompt_len.min(ids.len()),
            text: "",
        }
    }

    /// Sets the decoded text of the generated tokens.
    #[must_use]
    pub fn with_text(mut self, text: &'a str) -> Self {
        self.text = text;
        self
    }

    /// The tokens generated so far.
    pub fn generated(&self) -> &'a [u32] {
        &self.ids[self.prompt_len..]
    }
}

/// Changes the next-token logits of one row at a time.
///
/// A processor may keep state **per row**: [`LogitsProcessor::start`] is called at the start of
/// every generation with the number of rows, and [`LogitsProcessor::process`] names the row it
/// works on, so rows never share state and every row is processed (the original kept one state
/// per instance and only looked at the first row).
///
/// Processors never panic: an empty row, token ids outside the vocabulary or settings that do
/// not fit the logits give a [`LogitsError`]; NaN logits are compared in IEEE total order (the
/// generator itself refuses NaN logits from the model before any processor runs).
pub trait LogitsProcessor: Send + std::fmt::Debug {
    /// The processor's name (its `type` in TOML).
    fn name(&self) -> &'static str;

    /// A new generation over `rows` rows starts: reset per-row state.
    fn start(&mut self, rows: usize) {
        let _ = rows;
    }

    /// Processes the logits of `row` (one value per vocabulary entry) in place.
    fn process(&mut self, row: usize, ctx: &RowContext<'_>, logits: &mut [f32]) -> Result<()>;

    /// Statistics gathered since [`LogitsProcessor::start`], if the processor keeps any.
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Applies `processors` in order to the logits of `row`.
pub fn apply_all(
    processors: &mut [Box<dyn LogitsProcessor>],
    row: usize,
    ctx: &RowContext<'_>,
    logits: &mut [f32],
) -> Result<()> {
    for p in processors.iter_mut() {
        p.process(row, ctx, logits)?;
    }
    Ok(())
}

pub(crate) fn check_row(name: &str, logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(LogitsError::input(name, "empty logits row"));
    }
    Ok(())
}

pub(crate) fn check_ids(name: &str, what: &str, ids: &[u32], vocab: usize) -> Result<()> {
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(LogitsError::input(
            name,
            format!("{what} holds token id {bad}, outside the vocabulary of {vocab} logits"),
        ));
    }
    Ok(())
}

/// `softmax(logits)` in f32, computed as `torch.softmax` does (shift by the maximum).
/// A row without any finite value gives all zeros.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![0.0; logits.len()];
    }
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// `log_softmax(logits)` in f32.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let sum: f32 = logits.iter().map(|&x| (x - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&x| x - lse).collect()
}

/// Indices of `values` sorted ascending (IEEE total order; ties keep index order).
pub(crate) fn argsort_ascending(values: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    idx
}

/// The index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(values: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &v) in values.iter().enumerate() {
        if best.is_none_or(|b| v.total_cmp(&values[b]).is_gt()) {
            best = Some(i);
        }
    }
    best
}
