//! What a run optimises. The loop (`train_loop.rs`), data parallelism and checkpoints are the
//! same for every objective; an [`Objective`] says how one step's micro-batches become a loss and
//! its gradients, and how the validation data is scored. Supervised fine-tuning is
//! [`NextToken`]; a preference or reinforcement objective is another implementation of the
//! trait with its own micro-batch type, run by the same loop.

use burn::optim::GradientsParams;
use train_data::{Batch, Example, Sequence};
use train_model::{CausalLm, FusedAutodiffBackend};

use crate::eval::evaluate;
use crate::step::gradients_over;

/// A training objective over micro-batches of type [`Objective::Batch`].
///
/// The loss of an optimizer step is a mean over the *units* of all its micro-batches (for
/// [`NextToken`], the label tokens), whatever the accumulation or the number of workers: each
/// worker divides its micro-batches' summed loss by the step's total units, and the sums of the
/// workers add up.
pub trait Objective<B: FusedAutodiffBackend>: Sync {
    /// One micro-batch, as the [`crate::BatchPlan`] collates it.
    type Batch: Sync;

    /// How many units the step's mean counts in `batch`.
    fn units(&self, batch: &Self::Batch) -> usize;

    /// Tokens of `batch` that are scored (the step record's `label_tokens`).
    fn label_tokens(&self, batch: &Self::Batch) -> usize;

    /// Tokens `batch` runs through the model (for throughput), padding excluded.
    fn tokens(&self, batch: &Self::Batch) -> usize;

    /// A short name of the objective, recorded in checkpoints (`sft`, `dpo`, `grpo`): a run is
    /// resumed by the same objective only.
    fn name(&self) -> &'static str;

    /// The metric a progress line shows next to the loss, and its short label (GRPO's
    /// `reward`, DPO's `rewards/accuracies` as `acc`); none by default.
    fn headline(&self) -> Option<(&'static str, &'static str)> {
        None
    }

    /// What the units of [`Evaluation::units`] are, for messages (`tokens` by default).
    fn eval_unit(&self) -> &'static str {
        "tokens"
    }

    /// The objective's own settings, recorded in checkpoints; none by default.
    fn settings(&self) -> Option<serde_json::Value> {
        None
    }

    /// Names of the metrics the objective reports besides the loss (TRL's names, e.g.
    /// `rewards/chosen`), in the order of [`Contribution::metrics`] and
    /// [`Evaluation::metrics`]; none by default.
    fn metric_names(&self) -> Vec<String> {
        Vec::new()
    }

    /// Optimizer steps each step's data is used for (GRPO's `num_iterations`): the loop takes
    /// new micro-batches from the plan every `iterations()` steps and hands the same ones to
    /// [`Objective::prepare`] in between. 1 by default.
    fn iterations(&self) -> usize {
        1
    }

    /// Turns the plan's micro-batches of optimizer step `step` (0-based) into what
    /// [`Objective::gradients`] trains on, with the model as it is before the step: an online
    /// objective generates and scores completions here. Called on the main worker only, before
    /// the step's units are counted. Unchanged by default.
    fn prepare(
        &self,
        _model: &CausalLm<B>,
        _step: usize,
        batches: Vec<Self::Batch>,
    ) -> crate::Result<Vec<Self::Batch>> {
        Ok(batches)
    }

    /// The sampled completions of prepared `batches` to show (GRPO's completions table); none
    /// by default. Asked once per new data, on the steps that take it from the plan.
    fn rollouts(&self, _batches: &[Self::Batch]) -> Vec<train_monitor::RolloutSample> {
        Vec::new()
    }

    /// The summed loss of `batches` divided by `denominator` (the units of the whole step, on
    /// every worker), its gradients computed on `device`, and the metrics summed over the
    /// units of `batches` and divided by `denominator` the same way (so that the workers' sums
    /// add up to the step's means).
    fn gradients(
        &self,
        model: &CausalLm<B>,
        batches: &[&Self::Batch],
        denominator: f64,
        device: &burn::tensor::Device<B>,
    ) -> Contribution;

    /// The validation score of `model`: the mean loss and the units it is over; `None` when
    /// there is nothing to evaluate.
    fn evaluate(&self, model: &CausalLm<B::InnerBackend>) -> Option<Evaluation>;
}

/// A worker's share of an optimizer step: see [`Objective::gradients`].
pub struct Contribution {
    /// The share's summed loss / the step's units.
    pub loss: f64,
    /// The share's summed metrics / the step's units, in [`Objective::metric_names`] order,
    /// then, when the model adds its router's load-balancing loss, that term before its
    /// coefficient (each micro-batch's weighted by its share of the step's units: the loop
    /// logs it as `aux_loss`, as TRL does).
    pub metrics: Vec<f64>,
    /// The gradients of `loss`.
    pub grads: GradientsParams,
}

/// A validation score.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// Mean loss over the units.
    pub loss: f64,
    /// Units evaluated (label tokens for [`NextToken`]).
    pub units: u64,
    /// The mean of each metric over the units, in [`Objective::metric_names`] order.
    pub metrics: Vec<f64>,
}

/// Supervised fine-tuning: the mean cross-entropy of every label token's prediction
/// ([`crate::step_gradients`]); validation is the same mean over `validation`, in padded
/// micro-batches of `eval_batch_size` rows.
pub struct NextToken<'a> {
    /// Validation examples.
    pub validation: &'a [Example],
    /// Rows of a validation micro-batch.
    pub eval_batch_size: usize,
    /// Padding token id.
    pub pad_id: u32,
}

impl<B: FusedAutodiffBackend> Objective<B> for NextToken<'_> {
    type Batch = Batch;

    fn name(&self) -> &'static str {
        "sft"
    }

    fn units(&self, batch: &Batch) -> usize {
        batch.label_tokens
    }

    fn label_tokens(&self, batch: &Batch) -> usize {
        batch.label_tokens
    }

    fn tokens(&self, batch: &Batch) -> usize {
        batch.real_tokens
    }

    fn gradients(
        &self,
        model: &CausalLm<B>,
        batches: &[&Batch],
        denominator: f64,
        device: &burn::tensor::Device<B>,
    ) -> Contribution {
        let (loss, grads, router) =
            gradients_over(model, batches.iter().copied(), denominator, device);
        Contribution {
            loss,
            // The router's term, `aux_loss` (see `Contribution::metrics`).
            metrics: router.into_iter().collect(),
            grads,
        }
    }

    fn evaluate(&self, model: &CausalLm<B::InnerBackend>) -> Option<Evaluation> {
        if self.validation.is_empty() {
            return None;
        }
        let (sum, units) = evaluate(model, self.validation, self.eval_batch_size, self.pad_id);
        Some(Evaluation {
            loss: sum / units.max(1) as f64,
            units,
            metrics: Vec::new(),
        })
    }
}

/// A training row the [`crate::BatchPlan`] can put into micro-batches.
pub trait Collate: Clone {
    /// The micro-batch of several rows.
    type Batch;
    /// `rows` as one micro-batch, padded with `pad_id`.
    fn collate(rows: Vec<Self>, pad_id: u32) -> Self::Batch;
}

impl Collate for Sequence {
    type Batch = Batch;

    fn collate(rows: Vec<Sequence>, pad_id: u32) -> Batch {
        Batch::collate(rows, pad_id, None)
    }
}
