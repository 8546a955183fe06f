//! Batch generation with a KV cache: greedy or seeded sampling, per-row stop on end-of-sequence
//! ids, stop strings or the token budget.

use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use serde::Serialize;
use tokenizers::Tokenizer;
use train_data::SplitMix64;
use train_model::{CausalLm, FusedBackend, KvCache, ModelInput};

use crate::error::{LogitsError, Result};
use crate::processor::{LogitsProcessor, RowContext, apply_all, argmax};
use crate::stop::StopStrings;

/// How the next token is picked from the processed logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decoding {
    /// The most likely token (the first on ties), as `generate(do_sample=False)`.
    #[default]
    Greedy,
    /// A draw from `softmax(logits)`; row `r` uses its own generator seeded from `(seed, r)`, so
    /// a row's draws do not depend on the other rows.
    Sample {
        /// The seed.
        seed: u64,
    },
}

/// The ids that end a generated answer of the model in `dir`: `eos` (the config's eos ids), the
/// chat template's end-of-turn tokens and `generation_config.json`'s `eos_token_id`, as
/// `transformers.generate` gathers them; sorted, without duplicates.
pub fn end_ids(dir: &std::path::Path, eos: &[u32], tok: &train_data::ChatTokenizer) -> Vec<u32> {
    let mut ids = eos.to_vec();
    ids.extend(tok.end_of_turn_ids());
    if let Ok(text) = train_model::read_text_file(
        &dir.join("generation_config.json"),
        train_model::MAX_JSON_FILE_BYTES,
    ) && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
    {
        match &v["eos_token_id"] {
            serde_json::Value::Number(n) => {
                ids.extend(n.as_u64().and_then(|n| u32::try_from(n).ok()));
            }
            serde_json::Value::Array(a) => ids.extend(
                a.iter()
                    .filter_map(serde_json::Value::as_u64)
                    .filter_map(|n| u32::try_from(n).ok()),
            ),
            _ => {}
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Most tokens generated per row.
    pub max_new_tokens: usize,
    /// Greedy or sampling.
    pub decoding: Decoding,
    /// Ids that end a row (the model's eos ids and the chat template's end-of-turn ids).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a row when generated (needs a tokenizer).
    pub stop_strings: Vec<String>,
    /// Fed to rows that have finished, and used to left-pad shorter prompts.
    pub pad_token_id: u32,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            decoding: Decoding::Greedy,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            pad_token_id: 0,
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It generated an end-of-sequence or end-of-turn id.
    Eos,
    /// It completed a stop string.
    StopString,
    /// It reached `max_new_tokens`.
    MaxNewTokens,
}

impl StopReason {
    /// The name printed by `train generate`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::StopString => "stop_string",
            Self::MaxNewTokens => "max_new_tokens",
        }
    }
}

/// One row's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// Every generated token, the final end id included (as `generate` returns them).
    pub token_ids: Vec<u32>,
    /// The generated text without special tokens (empty without a tokenizer).
    pub text: String,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// The stop string it completed, if that is why.
    pub stop_string: Option<String>,
}

fn int_tensor<B: Backend>(
    values: Vec<i64>,
    shape: [usize; 2],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Next-token logits of every row, `[rows][vocab]`, from `[rows, seq, vocab]` logits.
fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> Result<Vec<Vec<f32>>> {
    let [b, s, v] = logits.dims();
    let last = logits
        .slice([0..b, s - 1..s, 0..v])
        .reshape([b, v])
        .cast(FloatDType::F32);
    let flat = last
        .into_data()
        .to_vec::<f32>()
        .map_err(|e| LogitsError::Generation(format!("reading logits: {e:?}")))?;
    Ok(flat.chunks(v).map(<[f32]>::to_vec).collect())
}

fn decode(tokenizer: Option<&Tokenizer>, ids: &[u32], skip_special: bool) -> Result<String> {
    match tokenizer {
        Some(t) => t
            .decode(ids, skip_special)
            .map_err(|e| LogitsError::Tokenizer(e.to_string())),
        None => Ok(String::new()),
    }
}

fn sample(logits: &[f32], rng: &mut SplitMix64) -> Option<usize> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let weights: Vec<f64> = logits.iter().map(|&x| f64::from(x - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64) * total;
    let mut cum = 0.0;
    let mut last = None;
    for (i, w) in weights.iter().enumerate() {
        if *w > 0.0 {
            cum += w;
            last = Some(i);
            if u < cum {
                return Some(i);
            }
        }
    }
    last
}

struct Row {
    ids: Vec<u32>,
    prompt_len: usize,
    text: String,
    done: Option<(StopReason, Option<String>)>,
    rng: SplitMix64,
}

/// Generates a continuation of every prompt (token ids, chat template already applied).
///
/// Prompts of different lengths are left-padded; padding gets its own attention segment and the
/// positions of each prompt start at 0, so a row's tokens are the same as when it is generated
/// alone. `processors` run in order on each row's next-token logits; they are restarted for
/// this generation first.
pub fn generate<B: FusedBackend>(
    model: &CausalLm<B>,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    processors: &mut [Box<dyn LogitsProcessor>],
    config: &GenerationConfig,
) -> Result<Vec<Generation>> {
    let never = std::sync::atomic::AtomicBool::new(false);
    generate_until(model, tokenizer, prompts, processors, config, &never)
}

/// [`generate`], abandoned with [`LogitsError::Cancelled`] as soon as `cancel` is raised (it is
/// read before each token): a stop request (Ctrl-C during GRPO's sampling) does not wait for
/// the rows to end.
pub fn generate_until<B: FusedBackend>(
    model: &CausalLm<B>,
    tokenizer: Option<&Tokenizer>,
    prompts: &[Vec<u32>],
    processors: &mut [Box<dyn LogitsProcessor>],
    config: &GenerationConfig,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Vec<Generation>> {
    if prompts.is_empty() {
        return Err(LogitsError::Generation("no prompt".into()));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(LogitsError::Generation(format!("prompt {i} is empty")));
    }
    let vocab = model.config.vocab_size;
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(LogitsError::Generation(format!(
            "prompt token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    if let Some(s) = config.stop_strings.iter().find(|s| s.contains('\u{fffd}')) {
        return Err(LogitsError::Generation(format!(
            "stop string {s:?} contains U+FFFD, which decoding uses for incomplete bytes; it cannot be matched"
        )));
    }
    let stops = StopStrings::new(config.stop_strings.clone());
    if !stops.is_empty() && tokenizer.is_none() {
        return Err(LogitsError::Generation(
            "stop strings need a tokenizer".into(),
        ));
    }
    let b = prompts.len();
    for p in processors.iter_mut() {
        p.start(b);
    }
    let mut rows: Vec<Row> = prompts
        .iter()
        .enumerate()
        .map(|(r, p)| Row {
            ids: p.clone(),
            prompt_len: p.len(),
            text: String::new(),
            done: (config.max_new_tokens == 0).then_some((StopReason::MaxNewTokens, None)),
            rng: match config.decoding {
                Decoding::Sample { seed } => SplitMix64::from_parts(&[seed, r as u64]),
                Decoding::Greedy => SplitMix64::new(0),
            },
        })
        .collect();

    let device = model.embed_tokens.val().device();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * longest);
    let mut pos = Vec::with_capacity(b * longest);
    let mut seg = Vec::with_capacity(b * longest);
    for p in prompts {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat_n(i64::from(config.pad_token_id), pad));
        ids.extend(p.iter().map(|&t| i64::from(t)));
        pos.extend(std::iter::repeat_n(0, pad));
        pos.extend(0..p.len() as i64);
        seg.extend(std::iter::repeat_n(0, pad));
        seg.extend(std::iter::repeat_n(1, p.len()));
    }
    let mut input = ModelInput {
        input_ids: int_tensor(ids, [b, longest], &device),
        position_ids: int_tensor(pos, [b, longest], &device),
        segment_ids: Some(int_tensor(seg, [b, longest], &device)),
    };
    let mut cache = KvCache::for_model(model);
    while rows.iter().any(|r| r.done.is_none()) {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(LogitsError::Cancelled);
        }
        let logits = last_logits(model.forward_cached(&input, &mut cache)?)?;
        let mut next = Vec::with_capacity(b);
        for (r, (row, mut l)) in rows.iter_mut().zip(logits).enumerate() {
            if row.done.is_some() {
                next.push(config.pad_token_id);
                continue;
            }
            if let Some(i) = l.iter().position(|x| x.is_nan()) {
                return Err(LogitsError::Generation(format!(
                    "the model produced a NaN logit (row {r}, token id {i}, generated step {})",
                    row.ids.len() - row.prompt_len
                )));
            }
            let ctx = RowContext::new(&row.ids, row.prompt_len).with_text(&row.text);
            apply_all(processors, r, &ctx, &mut l)?;
            let token = match config.decoding {
                Decoding::Greedy => argmax(&l).filter(|&i| l[i] > f32::NEG_INFINITY),
                Decoding::Sample { .. } => sample(&l, &mut row.rng),
            }
            .ok_or_else(|| {
                LogitsError::Generation(format!(
                    "row {r}: the processors left no token with a finite logit"
                ))
            })? as u32;
            row.ids.push(token);
            let generated = row.ids.len() - row.prompt_len;
            let before = std::mem::take(&mut row.text);
            row.text = decode(tokenizer, &row.ids[row.prompt_len..], false)?;
            if config.stop_token_ids.contains(&token) {
                row.done = Some((StopReason::Eos, None));
            } else if let Some(s) = stops.completed(&before, &row.text) {
                row.done = Some((StopReason::StopString, Some(s.to_string())));
            } else if generated >= config.max_new_tokens {
                row.done = Some((StopReason::MaxNewTokens, None));
            }
            next.push(token);
        }
        if rows.iter().all(|r| r.done.is_some()) {
            break;
        }
        let pos: Vec<i64> = rows.iter().map(|r| r.ids.len() as i64 - 1).collect();
        input = ModelInput {
            input_ids: int_tensor(
                next.iter().map(|&t| i64::from(t)).collect(),
                [b, 1],
                &device,
            ),
            position_ids: int_tensor(pos, [b, 1], &device),
            segment_ids: Some(int_tensor(vec![1; b], [b, 1], &device)),
        };
    }
    rows.into_iter()
        .map(|row| {
            let token_ids = row.ids[row.prompt_len..].to_vec();
            let (stop_reason, stop_string) = row.done.unwrap_or((StopReason::MaxNewTokens, None));
            let text_ids = match (stop_reason, token_ids.split_last()) {
                (StopReason::Eos, Some((_, rest))) => rest,
                _ => &token_ids[..],
            };
            Ok(Generation {
                text: decode(tokenizer, text_ids, true)?,
                token_ids,
                stop_reason,
                stop_string,
            })
        })
        .collect()
}
