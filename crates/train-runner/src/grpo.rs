//! Group relative policy optimisation (TRL's `GRPOTrainer`): for each prompt, sample
//! `num_generations` completions from the current policy, score them with reward functions,
//! normalise the rewards within each group into advantages, and train with the clipped
//! surrogate loss (and, with β > 0, a KL penalty to a reference model).
//!
//! Per completion token, with `r = exp(log π(t) − log π_old(t))` and advantage `A`:
//!
//! `ℓ = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) + β·r·(exp(ref − log π) − (ref − log π) − 1)`
//!
//! (the KL term multiplied by `r` unless `use_bias_correction_kl` is off, as in TRL)
//!
//! aggregated per `loss_type` as TRL does: `grpo` averages each completion's tokens, then the
//! completions; `dr_grpo` sums each completion's tokens over `max_new_tokens`, then averages the
//! completions; `dapo` (TRL's default) averages over every completion token of the step.
//! Log-probabilities are those of the logits divided by the sampling temperature, as TRL's.
//! With `num_iterations` 1, `π_old` is the policy itself (the ratio is 1, its gradient is the
//! policy gradient); with more, the completions of a step are trained on for that many
//! optimizer steps and `π_old` is the policy that sampled them.

use std::sync::{Arc, Mutex};

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, IndexingUpdateOp, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use train_data::{Batch, Example, PromptRow, Sequence, SplitMix64};
use train_logits::{Decoding, GenerationConfig, LogitsProcessor};
use train_model::{CausalLm, FusedAutodiffBackend, FusedBackend, NLL_CHUNK_LOGITS};

use crate::dpo::{completion_positions, final_hidden};
use crate::error::{Result, RunnerError};
use crate::objective::{Collate, Contribution, Evaluation, Objective};
use crate::rewards::{RewardInput, WeightedReward};
use crate::step::{
    TrainingHidden, add_router, backward_from_hidden, router_aux_coef, training_hidden,
    weigh_router,
};

/// How the token losses of a step are aggregated (TRL's `loss_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    /// The mean of each completion's token mean (the GRPO paper's; biased towards short
    /// completions with positive advantages).
    Grpo,
    /// Each completion's token sum over `max_new_tokens`, averaged over completions (Dr. GRPO).
    DrGrpo,
    /// The mean over every completion token of the step (DAPO; TRL's default).
    #[default]
    Dapo,
}

/// How rewards are scaled into advantages (TRL's `scale_rewards`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// Divided by the standard deviation of the prompt's group.
    #[default]
    Group,
    /// Divided by the standard deviation of the whole step's rewards.
    Batch,
    /// Not divided (Dr. GRPO's recommendation).
    None,
}

/// The settings of GRPO.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    /// Completions sampled per prompt (TRL's default 8).
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    /// Most tokens per completion (TRL's `max_completion_length`).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature; the trained log-probabilities use the same.
    #[serde(default = "one")]
    pub temperature: f64,
    /// KL coefficient β (0: no reference model, TRL's default).
    #[serde(default)]
    pub beta: f64,
    /// Lower clipping bound ε (and the upper one unless `epsilon_high` is set).
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Upper clipping bound (DAPO recommends 0.28); `epsilon` when absent.
    #[serde(default)]
    pub epsilon_high: Option<f64>,
    /// The aggregation of token losses.
    #[serde(default)]
    pub loss_type: GrpoLossType,
    /// Optimizer steps per batch of completions (μ).
    #[serde(default = "default_iterations")]
    pub num_iterations: usize,
    /// Reward scaling.
    #[serde(default)]
    pub scale_rewards: ScaleRewards,
    /// Multiply the KL term by the probability ratio (DeepSeek-V3.2's unbiased reverse-KL
    /// gradient; TRL's default since 1.x). It changes the KL gradient even on-policy.
    #[serde(default = "yes")]
    pub use_bias_correction_kl: bool,
}

fn yes() -> bool {
    true
}

fn default_generations() -> usize {
    8
}
fn default_max_new_tokens() -> usize {
    256
}
fn one() -> f64 {
    1.0
}
fn default_epsilon() -> f64 {
    0.2
}
fn default_iterations() -> usize {
    1
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            num_generations: default_generations(),
            max_new_tokens: default_max_new_tokens(),
            temperature: one(),
            beta: 0.0,
            epsilon: default_epsilon(),
            epsilon_high: None,
            loss_type: GrpoLossType::default(),
            num_iterations: default_iterations(),
            scale_rewards: ScaleRewards::default(),
            use_bias_correction_kl: true,
        }
    }
}

/// Most completions per prompt.
pub const MAX_GENERATIONS: usize = 1024;
/// Most optimizer steps per batch of completions.
pub const MAX_ITERATIONS: usize = 64;

impl GrpoConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, message: String| Err(RunnerError::config(field, message));
        if !(2..=MAX_GENERATIONS).contains(&self.num_generations) {
            return bad(
                "num_generations",
                format!(
                    "must be in 2..={MAX_GENERATIONS} (advantages compare completions of a prompt), got {}",
                    self.num_generations
                ),
            );
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be at least 1".into());
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(
                "temperature",
                format!("must be a positive number, got {}", self.temperature),
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad("beta", format!("must be ≥ 0, got {}", self.beta));
        }
        for (name, e) in [
            ("epsilon", Some(self.epsilon)),
            ("epsilon_high", self.epsilon_high),
        ] {
            if let Some(e) = e
                && !(e.is_finite() && e > 0.0)
            {
                return bad(name, format!("must be a positive number, got {e}"));
            }
        }
        if self.epsilon >= 1.0 {
            return bad(
                "epsilon",
                format!(
                    "must be below 1 (the ratio's lower bound is 1 − ε), got {}",
                    self.epsilon
                ),
            );
        }
        if !(1..=MAX_ITERATIONS).contains(&self.num_iterations) {
            return bad(
                "num_iterations",
                format!(
                    "must be in 1..={MAX_ITERATIONS}, got {}",
                    self.num_iterations
                ),
            );
        }
        Ok(())
    }

    fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

/// One training prompt: its tokens (the chat template's rendering with the generation prompt)
/// and the row it came from (its messages and other columns, for the rewards).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoRow {
    /// The prompt's tokens.
    pub prompt_ids: Vec<u32>,
    /// The row.
    pub row: Arc<PromptRow>,
}

/// The sampled completions of a micro-batch of prompts, their advantages, and what the loss
/// needs of the models that are not trained.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// `num_generations` rows per prompt, in prompt order: prompt + completion, labels on the
    /// completion.
    pub batch: Batch,
    /// Each completion's advantage.
    pub advantages: Vec<f64>,
    /// Each completion's token log-probabilities under the policy that sampled it (with
    /// several iterations only).
    pub old_logps: Option<Vec<Vec<f32>>>,
    /// Each completion's token log-probabilities under the reference (β > 0 only).
    pub ref_logps: Option<Vec<Vec<f32>>>,
    /// Completion tokens of the whole step (every micro-batch).
    pub step_tokens: usize,
    /// The step's generation metrics (rewards, lengths), on the first micro-batch of the step
    /// only (zeros elsewhere), so that the micro-batches' metrics add up to the step's.
    pub generation_metrics: Vec<f64>,
    /// The step's completions and rewards to show (first micro-batch only).
    pub samples: Vec<train_monitor::RolloutSample>,
}

/// A micro-batch of prompts and, once prepared, their rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptBatch {
    /// The prompts.
    pub prompts: Vec<GrpoRow>,
    /// Filled in by [`Objective::prepare`].
    pub rollout: Option<Arc<Rollout>>,
    /// Padding token id.
    pub pad_id: u32,
}

impl Collate for GrpoRow {
    type Batch = PromptBatch;

    fn collate(rows: Vec<GrpoRow>, pad_id: u32) -> PromptBatch {
        PromptBatch {
            prompts: rows,
            rollout: None,
            pad_id,
        }
    }
}

/// Each row's completion-token log-probabilities of `batch` under `model` (logits divided by
/// `temperature`), concatenated in row order (`[tokens]`, f32), and each row's count. The
/// logits are computed a chunk of rows at a time; on an autodiff backend the result carries
/// the graph.
pub fn token_logps<B: FusedBackend>(
    model: &CausalLm<B>,
    batch: &Batch,
    temperature: f64,
) -> (Tensor<B, 1>, Vec<usize>) {
    let device = model.embed_tokens.val().device();
    let rows = batch.batch_size;
    let (run, hidden) = final_hidden(model, batch, &device);
    let head = model.lm_head_weight().val();
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    let mut counts = Vec::with_capacity(rows);
    for (p, t) in completion_positions(&run, rows) {
        counts.push(p.len());
        positions.extend(p);
        targets.extend(t);
    }
    let m = positions.len();
    if m == 0 {
        return (
            Tensor::zeros([0], (&device, burn::tensor::DType::F32)),
            counts,
        );
    }
    let vocab = model.config.vocab_size.max(1);
    let chunk = (NLL_CHUNK_LOGITS / vocab).max(1);
    let head_t = head.cast(hidden.dtype()).transpose();
    let mut parts = Vec::with_capacity(m.div_ceil(chunk));
    let mut start = 0;
    while start < m {
        let len = chunk.min(m - start);
        let index = Tensor::<B, 1, Int>::from_data(
            TensorData::new(positions[start..start + len].to_vec(), [len]),
            &device,
        );
        let target = Tensor::<B, 2, Int>::from_data(
            TensorData::new(targets[start..start + len].to_vec(), [len, 1]),
            &device,
        );
        let logits = hidden
            .clone()
            .select(0, index)
            .matmul(head_t.clone())
            .cast(FloatDType::F32);
        let logits = if temperature == 1.0 {
            logits
        } else {
            logits.div_scalar(temperature)
        };
        parts.push(log_softmax(logits, 1).gather(1, target).reshape([len]));
        start += len;
    }
    (Tensor::cat(parts, 0), counts)
}

/// Sums over a micro-batch's completion tokens of the token metrics.
#[derive(Debug, Clone, Copy, Default)]
struct TokenSums {
    kl: f64,
    low: f64,
    high: f64,
    region: f64,
    /// The router's load-balancing term of the rollout, weighted by its share of the step,
    /// before its coefficient (when the model adds one).
    router: Option<f64>,
}

/// The per-token values of a `[tokens]` tensor, split per row by `counts`.
fn per_row<B: Backend>(values: Tensor<B, 1>, counts: &[usize]) -> Vec<Vec<f32>> {
    let flat: Vec<f32> = values
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    let mut out = Vec::with_capacity(counts.len());
    let mut at = 0;
    for &n in counts {
        out.push(
            flat.get(at..at + n)
                .map(<[f32]>::to_vec)
                .unwrap_or_default(),
        );
        at += n;
    }
    out
}

/// One completion token's loss terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLoss {
    /// The token's loss (before the aggregation weight).
    pub loss: f64,
    /// ∂loss / ∂(the policy's log-probability of the token).
    pub d_logp: f64,
    /// The KL estimate (0 without a reference).
    pub kl: f64,
    /// The ratio fell below 1 − ε with a negative advantage.
    pub low_clipped: bool,
    /// The ratio rose above 1 + ε_high with a positive advantage.
    pub high_clipped: bool,
}

/// The loss of one completion token, as TRL's `_compute_loss` (torch's `min` splits the
/// gradient evenly on ties; `clamp` passes it inside its closed range).
pub fn grpo_token_loss(
    config: &GrpoConfig,
    logp: f64,
    old_logp: f64,
    ref_logp: Option<f64>,
    advantage: f64,
) -> TokenLoss {
    let (lo, hi) = (1.0 - config.epsilon, 1.0 + config.epsilon_high());
    let r = (logp - old_logp).exp();
    let clipped = r.clamp(lo, hi);
    let (l1, l2) = (r * advantage, clipped * advantage);
    let d1 = r * advantage;
    let d2 = if (lo..=hi).contains(&r) { d1 } else { 0.0 };
    let (min, d_min) = if l1 < l2 {
        (l1, d1)
    } else if l2 < l1 {
        (l2, d2)
    } else {
        (l1, 0.5 * (d1 + d2))
    };
    let mut loss = -min;
    let mut d_logp = -d_min;
    let mut kl = 0.0;
    if let Some(reference) = ref_logp
        && config.beta != 0.0
    {
        let x = reference - logp;
        kl = x.exp() - x - 1.0;
        let mut d_kl = 1.0 - x.exp();
        if config.use_bias_correction_kl {
            // (kl · r)' = kl' · r + kl · r (r = exp(logp − old)).
            d_kl = d_kl * r + kl * r;
            kl *= r;
        }
        loss += config.beta * kl;
        d_logp += config.beta * d_kl;
    }
    TokenLoss {
        loss,
        d_logp,
        kl,
        low_clipped: r < lo && advantage < 0.0,
        high_clipped: r > hi && advantage > 0.0,
    }
}

/// The mean and the unbiased standard deviation of the finite values of `x` (`NaN` where
/// there are none, and for the deviation of fewer than two), as TRL's `nanmean`/`nanstd`.
fn nan_mean_std(x: &[f64]) -> (f64, f64) {
    let v: Vec<f64> = x.iter().copied().filter(|v| !v.is_nan()).collect();
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, if v.len() < 2 { f64::NAN } else { var.sqrt() })
}

/// Advantages of `rewards` (`NaN` = unscorable), `group` completions per prompt, as TRL's
/// `sum_then_normalize`: the reward minus its group's mean, divided per `scale` by the group's
/// or the step's standard deviation + 1e-4; unscorable completions get 0. Also says, per
/// completion, whether its group's deviation is 0 (TRL's `frac_reward_zero_std`).
pub fn group_advantages(
    rewards: &[f64],
    group: usize,
    scale: ScaleRewards,
) -> (Vec<f64>, Vec<bool>) {
    let group = group.max(1);
    let batch_std = nan_mean_std(rewards).1;
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut zero_std = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let (mean, group_std) = nan_mean_std(g);
        let std = match scale {
            ScaleRewards::Group | ScaleRewards::None => group_std,
            ScaleRewards::Batch => batch_std,
        };
        for &r in g {
            let mut a = r - mean;
            if scale != ScaleRewards::None {
                a /= std + 1e-4;
            }
            advantages.push(if a.is_nan() { 0.0 } else { a });
            // torch.isclose(std, 0): |std| ≤ 1e-8 (a NaN deviation is not close to 0).
            zero_std.push(std.abs() <= 1e-8);
        }
    }
    (advantages, zero_std)
}

/// GRPO over [`PromptBatch`]es. The policy samples with `processors` (a temperature processor
/// first when the temperature is not 1, then any others); `reference` is the model the KL
/// term compares with (needed when β > 0).
pub struct Grpo<'a, B: FusedAutodiffBackend> {
    /// The settings.
    pub config: GrpoConfig,
    /// The reward functions.
    pub rewards: &'a [WeightedReward],
    /// Decodes completions for the rewards.
    pub tokenizer: &'a tokenizers::Tokenizer,
    /// Ids that end a completion.
    pub stop_token_ids: Vec<u32>,
    /// Applied to the logits before sampling.
    pub processors: Mutex<Vec<Box<dyn LogitsProcessor>>>,
    /// The KL reference.
    pub reference: Option<CausalLm<B::InnerBackend>>,
    /// Sampling seed (the run's).
    pub seed: u64,
    /// The last step's prepared batches (with several iterations).
    cache: Mutex<Option<(usize, Vec<PromptBatch>)>>,
    /// Completion tokens whose logits are computed at once (`None`: as many as keep a chunk's
    /// f32 logits within `NLL_CHUNK_LOGITS`).
    logit_chunk: Option<usize>,
    /// Abandons a step's sampling when raised (the run's stop flag).
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl<'a, B: FusedAutodiffBackend> Grpo<'a, B> {
    /// GRPO with these parts.
    pub fn new(
        config: GrpoConfig,
        rewards: &'a [WeightedReward],
        tokenizer: &'a tokenizers::Tokenizer,
        stop_token_ids: Vec<u32>,
        processors: Vec<Box<dyn LogitsProcessor>>,
        reference: Option<CausalLm<B::InnerBackend>>,
        seed: u64,
    ) -> Self {
        Self {
            config,
            rewards,
            tokenizer,
            stop_token_ids,
            processors: Mutex::new(processors),
            reference,
            seed,
            cache: Mutex::new(None),
            logit_chunk: None,
            stop: None,
        }
    }

    /// Abandons a step's sampling as soon as `flag` is raised (give it the run's stop flag,
    /// [`crate::RunControl::flag`]): the loop then stops as it does between steps, saving the
    /// last completed step, instead of waiting for every completion to end. Not for runs over
    /// several machines, which agree on a stop at a step's all-reduce.
    #[must_use]
    pub fn with_stop(mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.stop = Some(flag);
        self
    }

    /// Computes the LM head and the token losses `tokens` completion tokens at a time (the
    /// default keeps a chunk's f32 logits within 64 MiB): less memory, or fewer, larger GEMMs.
    #[must_use]
    pub fn with_logit_chunk(mut self, tokens: usize) -> Self {
        self.logit_chunk = Some(tokens.max(1));
        self
    }

    fn generation_metric_names(&self) -> Vec<String> {
        let mut names = vec!["reward".to_string(), "reward_std".to_string()];
        for r in self.rewards {
            names.push(format!("rewards/{}/mean", r.function.name()));
            names.push(format!("rewards/{}/std", r.function.name()));
        }
        names.extend(
            [
                "frac_reward_zero_std",
                "completions/mean_length",
                "completions/min_length",
                "completions/max_length",
                "completions/clipped_ratio",
                "generation/tokens_per_sec",
            ]
            .map(String::from),
        );
        names
    }

    fn token_metric_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.config.beta != 0.0 {
            names.push("kl".to_string());
        }
        names.extend(
            [
                "clip_ratio/low_mean",
                "clip_ratio/high_mean",
                "clip_ratio/region_mean",
            ]
            .map(String::from),
        );
        names
    }

    /// The units a rollout adds to its step's denominator: its completions (the loss is a mean
    /// per completion) or, for DAPO, its completion tokens.
    fn rollout_units(&self, r: &Rollout) -> usize {
        match self.config.loss_type {
            GrpoLossType::Grpo | GrpoLossType::DrGrpo => r.advantages.len(),
            GrpoLossType::Dapo => r.batch.label_tokens,
        }
    }

    /// The loss of one micro-batch's completions (over `denominator`), its token metrics'
    /// sums, and its gradients. The LM head and the token losses are computed a chunk of
    /// completion tokens at a time outside the autodiff graph (as the fused LM head + loss of
    /// supervised training): per chunk, the logits / temperature, their log-softmax, each token's
    /// loss and its derivative `c` with respect to the token's log-probability, and then the
    /// gradient `c · (one_hot − softmax) / T` of the logits, carried to the hidden states (and to
    /// the head when it is trained). The hidden states' gradient then flows back through the
    /// model by autodiff. No `[tokens, vocab]` tensor outlives its chunk.
    fn rollout_gradients(
        &self,
        model: &CausalLm<B>,
        rollout: &Rollout,
        denominator: f64,
        device: &burn::tensor::Device<B>,
    ) -> (f64, TokenSums, Option<GradientsParams>) {
        let batch = &rollout.batch;
        let rows = batch.batch_size;
        let coef = router_aux_coef(model);
        let TrainingHidden {
            run,
            flat,
            aux,
            backprop,
        } = training_hidden(model, batch, device, coef.is_some());
        let [rows_flat, width] = flat.dims();
        let inner = flat.clone().inner();
        let head = model.lm_head_weight();
        let head_trained = head.is_require_grad();
        let dtype = inner.dtype();
        let weight = head.val().inner().cast(dtype);
        let temperature = self.config.temperature;
        let max_len = self.config.max_new_tokens.max(1) as f64;
        // Every completion token: (flattened position, target, row, index in its row).
        let mut tokens = Vec::new();
        for (row, (positions, targets)) in completion_positions(&run, rows).into_iter().enumerate()
        {
            for (t, (p, target)) in positions.into_iter().zip(targets).enumerate() {
                tokens.push((p, target, row, t));
            }
        }
        let mut counts = vec![0usize; rows];
        for &(_, _, row, _) in &tokens {
            counts[row] += 1;
        }
        let mut sums = TokenSums::default();
        if tokens.is_empty() {
            return (0.0, sums, None);
        }
        let mut loss = 0.0;
        // The router's load-balancing term, weighted by the rollout's share of the step's
        // units (see `router_aux_coef`).
        let router = match (aux, coef) {
            (Some(aux), Some(coef)) => {
                let share = self.rollout_units(rollout) as f64 / denominator;
                let (weighted, term) = weigh_router(aux, coef, share);
                loss = coef * term;
                sums.router = Some(term);
                Some(weighted)
            }
            _ => None,
        };
        let vocab = model.config.vocab_size.max(1);
        let chunk = self
            .logit_chunk
            .unwrap_or_else(|| (NLL_CHUNK_LOGITS / vocab).max(1));
        let mut grad_flat =
            Tensor::<B::InnerBackend, 2>::zeros([rows_flat, width], (device, dtype));
        let mut grad_head: Option<Tensor<B::InnerBackend, 2>> = None;
        for part in tokens.chunks(chunk) {
            let len = part.len();
            let index = Tensor::<B::InnerBackend, 1, Int>::from_data(
                TensorData::new(part.iter().map(|x| x.0).collect::<Vec<i64>>(), [len]),
                device,
            );
            let target = Tensor::<B::InnerBackend, 2, Int>::from_data(
                TensorData::new(part.iter().map(|x| x.1).collect::<Vec<i64>>(), [len, 1]),
                device,
            );
            let h = inner.clone().select(0, index.clone());
            let logits = h
                .clone()
                .matmul(weight.clone().transpose())
                .cast(FloatDType::F32);
            let logits = if temperature == 1.0 {
                logits
            } else {
                logits.div_scalar(temperature)
            };
            let logp_all = log_softmax(logits, 1);
            let picked: Vec<f32> = logp_all
                .clone()
                .gather(1, target.clone())
                .into_data()
                .convert::<f32>()
                .to_vec()
                .unwrap_or_default();
            // ∂loss/∂logp of each token of the chunk, over the step's units.
            let mut coef = Vec::with_capacity(len);
            for (&(_, _, row, t), &logp) in part.iter().zip(&picked) {
                let a = rollout.advantages.get(row).copied().unwrap_or(0.0);
                let weight = match self.config.loss_type {
                    GrpoLossType::Grpo => 1.0 / counts[row].max(1) as f64,
                    GrpoLossType::DrGrpo => 1.0 / max_len,
                    GrpoLossType::Dapo => 1.0,
                } / denominator;
                let logp = f64::from(logp);
                let old = rollout
                    .old_logps
                    .as_ref()
                    .and_then(|o| o.get(row)?.get(t).copied())
                    .map_or(logp, f64::from);
                let reference = rollout
                    .ref_logps
                    .as_ref()
                    .and_then(|r| r.get(row)?.get(t).copied())
                    .map(f64::from);
                let term = grpo_token_loss(&self.config, logp, old, reference, a);
                loss += weight * term.loss;
                coef.push((weight * term.d_logp / temperature) as f32);
                sums.kl += term.kl;
                sums.low += f64::from(u8::from(term.low_clipped));
                sums.high += f64::from(u8::from(term.high_clipped));
                sums.region += f64::from(u8::from(term.low_clipped || term.high_clipped));
            }
            // d(Σ c·logp)/d logits = c · (one_hot − softmax) / T.
            let c =
                Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(coef, [len, 1]), device);
            let grad_logits = (logp_all.exp() * c.clone().neg())
                .scatter(1, target, c, IndexingUpdateOp::Add)
                .cast(dtype);
            let grad_h = grad_logits.clone().matmul(weight.clone());
            grad_flat = grad_flat.select_assign(0, index, grad_h, IndexingUpdateOp::Add);
            if head_trained {
                let gw = grad_logits.transpose().matmul(h).cast(FloatDType::F32);
                grad_head = Some(match grad_head {
                    Some(total) => total + gw,
                    None => gw,
                });
            }
        }
        let grads = backward_from_hidden(model, backprop, flat, grad_flat, grad_head, router);
        (loss, sums, Some(grads))
    }

    /// Samples, decodes and scores the completions of `batches`, and computes their
    /// advantages and the log-probabilities the loss needs.
    fn rollout(
        &self,
        model: &CausalLm<B>,
        step: usize,
        batches: &[PromptBatch],
    ) -> Result<Vec<PromptBatch>> {
        let g = self.config.num_generations;
        let policy = model.valid();
        let mut processors = self
            .processors
            .lock()
            .map_err(|_| RunnerError::Parallel("a generation thread panicked".into()))?;
        // Per micro-batch: the completions (tokens, text, whether they ended).
        let started = std::time::Instant::now();
        let mut generated = Vec::with_capacity(batches.len());
        for (k, pb) in batches.iter().enumerate() {
            let prompts: Vec<Vec<u32>> = pb
                .prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.prompt_ids.clone(), g))
                .collect();
            let seed = SplitMix64::from_parts(&[self.seed, step as u64, k as u64]).next_u64();
            let config = GenerationConfig {
                max_new_tokens: self.config.max_new_tokens,
                decoding: Decoding::Sample { seed },
                stop_token_ids: self.stop_token_ids.clone(),
                stop_strings: Vec::new(),
                pad_token_id: pb.pad_id,
            };
            let never = std::sync::atomic::AtomicBool::new(false);
            generated.push(train_logits::generate_until(
                &policy,
                Some(self.tokenizer),
                &prompts,
                &mut processors,
                &config,
                self.stop.as_deref().unwrap_or(&never),
            )?);
        }
        drop(processors);
        let generation_seconds = started.elapsed().as_secs_f64();
        // The rewards of every completion of the step, one call per function.
        let inputs: Vec<RewardInput<'_>> = batches
            .iter()
            .zip(&generated)
            .flat_map(|(pb, gens)| {
                gens.iter().enumerate().map(move |(i, gen_)| {
                    let row = &pb.prompts[i / g].row;
                    RewardInput {
                        prompt: &row.prompt,
                        completion: &gen_.text,
                        completion_tokens: gen_.token_ids.len(),
                        columns: &row.columns,
                        location: row.location.as_ref(),
                    }
                })
            })
            .collect();
        let n = inputs.len();
        let mut per_function = Vec::with_capacity(self.rewards.len());
        for r in self.rewards {
            let scores = r
                .function
                .score(&inputs)
                .map_err(|message| RunnerError::Reward {
                    function: r.function.name().to_string(),
                    message,
                })?;
            if scores.len() != n {
                return Err(RunnerError::Reward {
                    function: r.function.name().to_string(),
                    message: format!("{} scores for {n} completions", scores.len()),
                });
            }
            per_function.push(scores);
        }
        let rewards: Vec<f64> = (0..n)
            .map(|i| {
                let mut any = false;
                let mut sum = 0.0;
                for (r, scores) in self.rewards.iter().zip(&per_function) {
                    if let Some(s) = scores[i] {
                        any = true;
                        sum += r.weight * s;
                    }
                }
                if any { sum } else { f64::NAN }
            })
            .collect();
        let (advantages, zero_std) = group_advantages(&rewards, g, self.config.scale_rewards);
        let lengths: Vec<usize> = inputs.iter().map(|i| i.completion_tokens).collect();
        let truncated = generated
            .iter()
            .flatten()
            .filter(|x| x.stop_reason == train_logits::StopReason::MaxNewTokens)
            .count();
        // TRL's metrics of the generation batch.
        let mut metrics = Vec::new();
        let (mean, std) = nan_mean_std(&rewards);
        metrics.extend([mean, std]);
        for scores in &per_function {
            let v: Vec<f64> = scores.iter().map(|s| s.unwrap_or(f64::NAN)).collect();
            let (m, s) = nan_mean_std(&v);
            metrics.extend([m, s]);
        }
        let nf = n.max(1) as f64;
        metrics.push(zero_std.iter().filter(|&&z| z).count() as f64 / nf);
        metrics.push(lengths.iter().sum::<usize>() as f64 / nf);
        metrics.push(lengths.iter().copied().min().unwrap_or(0) as f64);
        metrics.push(lengths.iter().copied().max().unwrap_or(0) as f64);
        metrics.push(truncated as f64 / nf);
        metrics.push(lengths.iter().sum::<usize>() as f64 / generation_seconds.max(1e-9));
        let step_tokens: usize = lengths.iter().sum();
        let samples: Vec<train_monitor::RolloutSample> = inputs
            .iter()
            .enumerate()
            .map(|(i, input)| train_monitor::RolloutSample {
                step: step + 1,
                index: i,
                prompt: input
                    .prompt
                    .last()
                    .map(|m| m.content.clone())
                    .unwrap_or_default(),
                completion: input.completion.to_string(),
                rewards: self
                    .rewards
                    .iter()
                    .zip(&per_function)
                    .map(|(r, s)| (r.function.name().to_string(), s[i]))
                    .collect(),
                reward: (!rewards[i].is_nan()).then_some(rewards[i]),
                advantage: advantages[i],
            })
            .collect();
        let iterations = self.config.num_iterations > 1;
        let mut out = Vec::with_capacity(batches.len());
        let mut offset = 0;
        let zeros = vec![0.0; metrics.len()];
        for (k, (pb, gens)) in batches.iter().zip(generated).enumerate() {
            let sequences: Vec<Sequence> = pb
                .prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p, g))
                .zip(&gens)
                .map(|(p, gen_)| {
                    let mut input_ids = p.prompt_ids.clone();
                    input_ids.extend(&gen_.token_ids);
                    let mut labels = vec![train_data::IGNORE_INDEX; p.prompt_ids.len()];
                    labels.extend(gen_.token_ids.iter().map(|&t| t as i32));
                    Sequence::pack(&[&Example {
                        row: p.row.location.as_ref().map_or(0, |l| l.row),
                        input_ids,
                        labels,
                    }])
                })
                .collect();
            let batch = Batch::collate(sequences, pb.pad_id, None);
            let count = gens.len();
            let old_logps = iterations.then(|| {
                let (v, c) = token_logps(&policy, &batch, self.config.temperature);
                per_row(v, &c)
            });
            let ref_logps = match &self.reference {
                Some(reference) if self.config.beta != 0.0 => {
                    let (v, c) = token_logps(reference, &batch, self.config.temperature);
                    Some(per_row(v, &c))
                }
                _ => None,
            };
            out.push(PromptBatch {
                prompts: pb.prompts.clone(),
                pad_id: pb.pad_id,
                rollout: Some(Arc::new(Rollout {
                    batch,
                    advantages: advantages[offset..offset + count].to_vec(),
                    old_logps,
                    ref_logps,
                    step_tokens,
                    generation_metrics: if k == 0 {
                        metrics.clone()
                    } else {
                        zeros.clone()
                    },
                    samples: if k == 0 { samples.clone() } else { Vec::new() },
                })),
            });
            offset += count;
        }
        Ok(out)
    }
}

impl<B: FusedAutodiffBackend> Objective<B> for Grpo<'_, B>
where
    B::InnerBackend: FusedBackend,
{
    type Batch = PromptBatch;

    fn name(&self) -> &'static str {
        "grpo"
    }

    fn headline(&self) -> Option<(&'static str, &'static str)> {
        Some(("reward", "reward"))
    }

    fn settings(&self) -> Option<serde_json::Value> {
        let mut v = serde_json::to_value(self.config).ok()?;
        if let Some(obj) = v.as_object_mut() {
            let rewards: Vec<serde_json::Value> = self
                .rewards
                .iter()
                .map(|r| serde_json::json!({"name": r.function.name(), "weight": r.weight}))
                .collect();
            obj.insert("rewards".into(), rewards.into());
        }
        Some(v)
    }

    fn units(&self, batch: &PromptBatch) -> usize {
        batch.rollout.as_ref().map_or(0, |r| self.rollout_units(r))
    }

    fn label_tokens(&self, batch: &PromptBatch) -> usize {
        batch.rollout.as_ref().map_or(0, |r| r.batch.label_tokens)
    }

    fn tokens(&self, batch: &PromptBatch) -> usize {
        batch.rollout.as_ref().map_or(0, |r| r.batch.real_tokens)
    }

    fn metric_names(&self) -> Vec<String> {
        let mut names = self.generation_metric_names();
        names.extend(self.token_metric_names());
        names
    }

    fn iterations(&self) -> usize {
        self.config.num_iterations
    }

    fn prepare(
        &self,
        model: &CausalLm<B>,
        step: usize,
        batches: Vec<PromptBatch>,
    ) -> Result<Vec<PromptBatch>> {
        let mu = self.config.num_iterations.max(1);
        let first = step - step % mu;
        if mu > 1
            && let Ok(cache) = self.cache.lock()
            && let Some((at, cached)) = cache.as_ref()
            && *at == first
        {
            return Ok(cached.clone());
        }
        // A resumed run that stopped between iterations samples that step's prompts afresh
        // (the policy that sampled them is gone), with the seed of their first step.
        let prepared = self.rollout(model, first, &batches)?;
        if mu > 1
            && let Ok(mut cache) = self.cache.lock()
        {
            *cache = Some((first, prepared.clone()));
        }
        Ok(prepared)
    }

    fn rollouts(&self, batches: &[PromptBatch]) -> Vec<train_monitor::RolloutSample> {
        batches
            .iter()
            .filter_map(|b| b.rollout.as_ref())
            .flat_map(|r| r.samples.iter().cloned())
            .collect()
    }

    fn gradients(
        &self,
        model: &CausalLm<B>,
        batches: &[&PromptBatch],
        denominator: f64,
        device: &burn::tensor::Device<B>,
    ) -> Contribution {
        let mut accumulator = GradientsAccumulator::<CausalLm<B>>::new();
        let generation = self.generation_metric_names().len();
        let token_names = self.token_metric_names().len();
        let mut metrics = vec![0f64; generation + token_names];
        let mut step_loss = 0f64;
        let mut router = None;
        for pb in batches {
            let Some(rollout) = &pb.rollout else {
                continue;
            };
            for (m, v) in metrics.iter_mut().zip(&rollout.generation_metrics) {
                *m += v;
            }
            let (loss, sums, grads) = self.rollout_gradients(model, rollout, denominator, device);
            step_loss += loss;
            let step_tokens = rollout.step_tokens.max(1) as f64;
            let mut token_metrics = Vec::with_capacity(token_names);
            if self.config.beta != 0.0 {
                token_metrics.push(sums.kl / step_tokens);
            }
            token_metrics.extend([
                sums.low / step_tokens,
                sums.high / step_tokens,
                sums.region / step_tokens,
            ]);
            for (m, v) in metrics[generation..].iter_mut().zip(token_metrics) {
                *m += v;
            }
            router = add_router(router, sums.router);
            if let Some(grads) = grads {
                accumulator.accumulate(model, grads);
            }
        }
        metrics.extend(router);
        Contribution {
            loss: step_loss,
            metrics,
            grads: accumulator.grads(),
        }
    }

    fn evaluate(&self, _model: &CausalLm<B::InnerBackend>) -> Option<Evaluation> {
        None
    }
}

/// Runs GRPO on `prompts` to the end, as [`crate::run`] runs supervised fine-tuning: the same
/// loop, checkpoints, resume, observer and final save. The `train` and `validation` fields of
/// `setup` are not used; there is no validation.
pub fn run_grpo<B: FusedAutodiffBackend>(
    setup: crate::TrainSetup<B>,
    prompts: Vec<GrpoRow>,
    objective: &Grpo<'_, B>,
    resume: Option<&crate::Resume>,
    observer: &mut dyn crate::TrainObserver<B>,
    control: &crate::RunControl,
) -> Result<crate::RunSummary> {
    objective.config.validate()?;
    if objective.config.beta != 0.0 && objective.reference.is_none() {
        return Err(RunnerError::config("beta", "β > 0 needs a reference model"));
    }
    let config = objective.config;
    let training = crate::run::Training {
        rows: prompts,
        packed_to: None,
        packing_efficiency: None,
        validation_len: 0,
        check: move |rows: &[GrpoRow], trainer: &crate::TrainerConfig, vocab: usize| {
            use crate::config::limits::MAX_MICRO_BATCH_TOKENS;
            let longest =
                rows.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0) + config.max_new_tokens;
            let tokens = trainer
                .batch_size
                .saturating_mul(config.num_generations)
                .saturating_mul(longest);
            if tokens > MAX_MICRO_BATCH_TOKENS {
                return Err(RunnerError::config(
                    "max_new_tokens",
                    format!(
                        "batch_size {} prompts × num_generations {} × (the longest prompt + \
                         max_new_tokens = {longest}) = {tokens} tokens per micro-batch, above \
                         the limit {MAX_MICRO_BATCH_TOKENS}",
                        trainer.batch_size, config.num_generations
                    ),
                ));
            }
            for (i, r) in rows.iter().enumerate() {
                if let Some(t) = r.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(RunnerError::config(
                        "dataset",
                        format!(
                            "prompt {}: token id {t} is outside the model's vocabulary of {vocab}",
                            i + 1
                        ),
                    ));
                }
            }
            Ok(())
        },
    };
    crate::run::run_objective(setup, training, objective, resume, observer, control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_loss_derivative_matches_finite_differences() {
        let configs = [
            GrpoConfig::default(),
            GrpoConfig {
                beta: 0.04,
                epsilon_high: Some(0.28),
                ..GrpoConfig::default()
            },
        ];
        for config in configs {
            for (old_shift, a, reference) in [
                (0.0, 1.3, Some(-2.0)),
                (0.05, -0.7, Some(-1.0)),
                (-0.4, 0.9, None),
                (0.5, 0.9, Some(-3.0)),
                (-0.5, -0.9, Some(-0.5)),
            ] {
                let logp = -1.25;
                let old = logp + old_shift;
                let at = |x: f64| grpo_token_loss(&config, x, old, reference, a).loss;
                let h = 1e-6;
                let numeric = (at(logp + h) - at(logp - h)) / (2.0 * h);
                let got = grpo_token_loss(&config, logp, old, reference, a);
                if old_shift == 0.0 {
                    // At ratio 1 the two branches of the min are equal: torch splits the
                    // gradient, which sums to the policy gradient −A (+ the KL's).
                    let kl_d = reference.map_or(0.0, |r: f64| {
                        let x = r - logp;
                        config.beta * ((1.0 - x.exp()) + (x.exp() - x - 1.0))
                    });
                    assert!((got.d_logp - (-a + kl_d)).abs() < 1e-12, "{got:?}");
                } else {
                    assert!(
                        (got.d_logp - numeric).abs() < 1e-5,
                        "{config:?} shift {old_shift} a {a}: {} vs {numeric}",
                        got.d_logp
                    );
                }
            }
        }
        // Clipped: a ratio above 1 + ε with a positive advantage has no gradient.
        let c = GrpoConfig::default();
        let t = grpo_token_loss(&c, 0.0, -0.5, None, 1.0);
        assert!(t.high_clipped && t.d_logp == 0.0 && (t.loss + 1.2).abs() < 1e-12);
        let t = grpo_token_loss(&c, -0.5, 0.0, None, -1.0);
        assert!(t.low_clipped && t.d_logp == 0.0);
    }

    #[test]
    fn advantages_as_trl() {
        // Group [1, 0, 0, 1]: mean 0.5, unbiased std 0.57735.
        let (a, z) = group_advantages(
            &[1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0],
            4,
            ScaleRewards::Group,
        );
        let s = (1.0f64 / 3.0).sqrt() + 1e-4;
        assert!((a[0] - 0.5 / s).abs() < 1e-12 && (a[1] + 0.5 / s).abs() < 1e-12);
        assert_eq!(&a[4..], [0.0; 4]);
        assert_eq!(z, [false, false, false, false, true, true, true, true]);
        let (a, _) = group_advantages(&[1.0, 3.0], 2, ScaleRewards::None);
        assert_eq!(a, [-1.0, 1.0]);
        // Unscorable completions: out of the mean, advantage 0.
        let (a, _) = group_advantages(&[f64::NAN, 1.0, 3.0], 3, ScaleRewards::None);
        assert_eq!(a, [0.0, -1.0, 1.0]);
        let (a, _) = group_advantages(&[0.0, 1.0, 0.0, 3.0], 2, ScaleRewards::Batch);
        let batch_std = nan_mean_std(&[0.0, 1.0, 0.0, 3.0]).1 + 1e-4;
        assert!((a[3] - 1.5 / batch_std).abs() < 1e-12);
    }

    #[test]
    fn settings_are_checked() {
        GrpoConfig::default().validate().unwrap();
        for bad in [
            GrpoConfig {
                num_generations: 1,
                ..GrpoConfig::default()
            },
            GrpoConfig {
                temperature: 0.0,
                ..GrpoConfig::default()
            },
            GrpoConfig {
                beta: -0.1,
                ..GrpoConfig::default()
            },
            GrpoConfig {
                epsilon: 1.0,
                ..GrpoConfig::default()
            },
            GrpoConfig {
                num_iterations: 0,
                ..GrpoConfig::default()
            },
            GrpoConfig {
                max_new_tokens: 0,
                ..GrpoConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
