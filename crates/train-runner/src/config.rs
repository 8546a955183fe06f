//! Training settings: the seed's `TrainerConfig`, completed with `transformers.TrainingArguments`
//! semantics where the seed is silent.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use train_model::{LoraConfig, StorageDtype};

use crate::error::{Result, RunnerError};

/// Upper bounds of the counts and sizes a run may ask for: far above any real run, low enough
/// that no setting overflows an index or asks for terabytes before anything is checked. The CLI
/// checks its flags against the same constants when it parses them.
pub mod limits {
    /// `batch_size`, `eval_batch_size`.
    pub const MAX_BATCH_SIZE: usize = 1 << 16;
    /// `gradient_accumulation_steps`.
    pub const MAX_GRADIENT_ACCUMULATION: usize = 1 << 16;
    /// `max_length` (tokens of one example or packed row; the data side's bound).
    pub const MAX_LENGTH: usize = train_data::MAX_LENGTH;
    /// Tokens of one micro-batch: `batch_size ×` the longest row it can hold (`max_length`
    /// with packing).
    pub const MAX_MICRO_BATCH_TOKENS: usize = 1 << 24;
    /// Data-parallel workers on one machine.
    pub const MAX_DEVICES: usize = 256;
    /// Machines of one run.
    pub const MAX_NODES: usize = 1024;
    /// `num_epochs`.
    pub const MAX_EPOCHS: usize = 1 << 20;
    /// LoRA rank.
    pub const MAX_LORA_RANK: usize = 1 << 14;
}

/// How the learning rate evolves over the run (after `warmup_steps` of linear warm-up).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// Constant.
    Constant,
    /// Linear decay to 0 at the last step (`TrainingArguments`' default).
    #[default]
    Linear,
    /// Half a cosine from the peak to 0.
    Cosine,
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (0-based) out of `total`, as `transformers`'
    /// `get_scheduler` schedules compute it (`LambdaLR` evaluated at the step index).
    pub fn lr_at(self, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
        let (s, t, w) = (step as f64, total.max(1) as f64, warmup as f64);
        if step < warmup {
            return base * s / w.max(1.0);
        }
        let factor = match self {
            Self::Constant => 1.0,
            Self::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Self::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        base * factor
    }
}

/// When evaluations or checkpoints happen (`transformers`' `IntervalStrategy`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum IntervalStrategy {
    /// Every `eval_steps` / `save_steps` steps, and after the last step.
    #[default]
    Steps,
    /// At the end of every epoch (and after the last step).
    Epoch,
    /// Never (a stop on request still saves a checkpoint, so that nothing is lost).
    No,
}

/// The Hugging Face `TrainingArguments` names [`TrainerConfig`] accepts for its keys (alias,
/// key): its serde aliases, listed for the documentation (a test keeps the two equal).
pub const TRAINER_KEY_ALIASES: &[(&str, &str)] = &[
    ("per_device_train_batch_size", "batch_size"),
    ("num_train_epochs", "num_epochs"),
    ("evaluation_strategy", "eval_strategy"),
    ("lr_scheduler_type", "lr_scheduler"),
    ("per_device_eval_batch_size", "eval_batch_size"),
];

/// Everything that shapes a training run.
///
/// Hugging Face `TrainingArguments` names are accepted as aliases of the keys that differ
/// ([`TRAINER_KEY_ALIASES`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Where checkpoints, metrics and the final model go.
    pub output_dir: PathBuf,
    /// Examples (or packed rows) per micro-batch. Default 16.
    #[serde(alias = "per_device_train_batch_size")]
    pub batch_size: usize,
    /// Peak learning rate. Default 2e-4.
    pub learning_rate: f64,
    /// Epochs over the training split. Default 3.
    #[serde(alias = "num_train_epochs")]
    pub num_epochs: usize,
    /// Optimizer steps; overrides `num_epochs` when set.
    pub max_steps: Option<usize>,
    /// Evaluate every this many steps (and at the end) with `eval_strategy = "steps"`.
    /// Default 50.
    pub eval_steps: usize,
    /// Save a checkpoint every this many steps (and at the end) with `save_strategy =
    /// "steps"`. Default 1000.
    pub save_steps: usize,
    /// When to evaluate: `steps`, `epoch` or `no`. Default steps.
    #[serde(alias = "evaluation_strategy")]
    pub eval_strategy: IntervalStrategy,
    /// When to save a checkpoint: `steps`, `epoch` or `no`. Default steps.
    pub save_strategy: IntervalStrategy,
    /// A row of `metrics.jsonl` every this many steps (and after the last): the loss and the
    /// objective's metrics averaged over those steps, tokens/s over their time, the learning
    /// rate and gradient norm of the last one (as `Trainer` logs). Default 1.
    pub logging_steps: usize,
    /// Micro-batches per optimizer step. Default 1.
    pub gradient_accumulation_steps: usize,
    /// Linear warm-up steps. Default 0.
    pub warmup_steps: usize,
    /// Linear warm-up as a fraction of the run's steps (`ceil(ratio × steps)`), when
    /// `warmup_steps` is 0 (`warmup_steps` wins, as in `transformers`). Default 0.
    pub warmup_ratio: f64,
    /// Learning-rate schedule. Default linear.
    #[serde(alias = "lr_scheduler_type")]
    pub lr_scheduler: LrSchedule,
    /// Decoupled weight decay (not applied to biases and norm weights). Default 0.
    pub weight_decay: f64,
    /// AdamW β1. Default 0.9.
    pub adam_beta1: f64,
    /// AdamW β2. Default 0.999.
    pub adam_beta2: f64,
    /// AdamW ε. Default 1e-8.
    pub adam_epsilon: f64,
    /// Global gradient-norm clipping; 0 disables. Default 1.0.
    pub max_grad_norm: f64,
    /// Seed of the shuffling and of new weights (LoRA adapters). The data's own seed
    /// (transforms, split) is `train_data::DatasetConfig::seed`. Default 42.
    pub seed: u64,
    /// Shuffle the training rows each epoch. Default true.
    pub shuffle: bool,
    /// Keep at most this many checkpoints (the best one is always kept).
    pub save_total_limit: Option<usize>,
    /// Do not evaluate.
    pub skip_validation: bool,
    /// Micro-batch size of evaluation; default `batch_size`.
    #[serde(alias = "per_device_eval_batch_size")]
    pub eval_batch_size: Option<usize>,
    /// Dtype of the final model on disk; default the source checkpoint's. Checkpoints always
    /// keep f32 master weights so that a resumed run is exact.
    pub save_dtype: Option<StorageDtype>,
    /// Train LoRA adapters on a frozen model instead of every weight (PEFT's defaults for the
    /// fields left out). Checkpoints and the final output are then PEFT adapter directories.
    pub lora: Option<LoraConfig>,
    /// Weight of a mixture-of-experts router's load-balancing loss in the training loss of
    /// every objective, as TRL's trainers add it (their `router_aux_loss_coef`): unset, the
    /// model's own `router_aux_loss_coef`; 0 leaves the loss out. A dense model refuses a
    /// non-zero value.
    pub router_aux_loss_coef: Option<f64>,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping
    /// them (`TrainingArguments.gradient_checkpointing`): a step then holds the activations of
    /// one layer rather than of every layer, for one more forward pass of compute. Same
    /// gradients. Default false.
    pub gradient_checkpointing: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("outputs"),
            batch_size: 16,
            learning_rate: 2e-4,
            num_epochs: 3,
            max_steps: None,
            eval_steps: 50,
            save_steps: 1000,
            eval_strategy: IntervalStrategy::Steps,
            save_strategy: IntervalStrategy::Steps,
            logging_steps: 1,
            gradient_accumulation_steps: 1,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            lr_scheduler: LrSchedule::Linear,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            shuffle: true,
            save_total_limit: None,
            skip_validation: false,
            eval_batch_size: None,
            save_dtype: None,
            lora: None,
            router_aux_loss_coef: None,
            gradient_checkpointing: false,
        }
    }
}

impl TrainerConfig {
    /// Warm-up steps of a run of `total` steps: `warmup_steps`, else `ceil(warmup_ratio ×
    /// total)` (`TrainingArguments.get_warmup_steps`).
    pub fn warmup_for(&self, total: usize) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (total as f64 * self.warmup_ratio).ceil() as usize
        }
    }

    /// Checks every setting, naming the first one out of range.
    pub fn validate(&self) -> Result<()> {
        let positive = |field: &str, v: usize| {
            if v == 0 {
                Err(RunnerError::config(field, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("batch_size", self.batch_size)?;
        positive("num_epochs", self.num_epochs)?;
        positive("eval_steps", self.eval_steps)?;
        positive("save_steps", self.save_steps)?;
        positive("logging_steps", self.logging_steps)?;
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(RunnerError::config(
                "warmup_ratio",
                format!("{} must be in [0, 1)", self.warmup_ratio),
            ));
        }
        positive(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
        )?;
        let at_most = |field: &str, v: usize, max: usize| {
            if v > max {
                Err(RunnerError::config(
                    field,
                    format!("{v} is above the limit {max}"),
                ))
            } else {
                Ok(())
            }
        };
        use limits::*;
        at_most("batch_size", self.batch_size, MAX_BATCH_SIZE)?;
        at_most(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            MAX_GRADIENT_ACCUMULATION,
        )?;
        at_most("num_epochs", self.num_epochs, MAX_EPOCHS)?;
        if let Some(s) = self.eval_batch_size {
            at_most("eval_batch_size", s, MAX_BATCH_SIZE)?;
        }
        if let Some(lora) = &self.lora {
            at_most("lora_r", lora.r, MAX_LORA_RANK)?;
        }
        if let Some(lora) = &self.lora {
            lora.validate()
                .map_err(|e| RunnerError::config("lora", e.to_string()))?;
        }
        if let Some(s) = self.max_steps {
            positive("max_steps", s)?;
        }
        if let Some(s) = self.eval_batch_size {
            positive("eval_batch_size", s)?;
        }
        if let Some(s) = self.save_total_limit {
            positive("save_total_limit", s)?;
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err(RunnerError::config(
                "learning_rate",
                format!("{} must be a positive number", self.learning_rate),
            ));
        }
        for (field, v) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(RunnerError::config(field, format!("{v} must be in [0, 1)")));
            }
        }
        if !(self.adam_epsilon > 0.0 && self.adam_epsilon.is_finite()) {
            return Err(RunnerError::config(
                "adam_epsilon",
                "must be a positive number",
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(RunnerError::config(
                "weight_decay",
                "must be a non-negative number",
            ));
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return Err(RunnerError::config(
                "max_grad_norm",
                "must be a non-negative number (0 disables clipping)",
            ));
        }
        if let Some(c) = self.router_aux_loss_coef
            && !(c >= 0.0 && c.is_finite())
        {
            return Err(RunnerError::config(
                "router_aux_loss_coef",
                format!("{c} must be a non-negative number (0 leaves the router's loss out)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        // linear, no warm-up: 1, 0.75, 0.5, 0.25 of the base for 4 steps.
        let lrs: Vec<f64> = (0..4)
            .map(|s| LrSchedule::Linear.lr_at(1.0, s, 4, 0))
            .collect();
        assert_eq!(lrs, [1.0, 0.75, 0.5, 0.25]);
        // warm-up starts at 0.
        assert_eq!(LrSchedule::Constant.lr_at(2.0, 0, 10, 2), 0.0);
        assert_eq!(LrSchedule::Constant.lr_at(2.0, 1, 10, 2), 1.0);
        assert_eq!(LrSchedule::Constant.lr_at(2.0, 5, 10, 2), 2.0);
        let c = LrSchedule::Cosine.lr_at(1.0, 6, 10, 2);
        assert!((c - 0.5).abs() < 1e-12, "{c}");
        assert!(LrSchedule::Linear.lr_at(1.0, 12, 10, 0) == 0.0);
    }

    #[test]
    fn warmup_ratio_rounds_up_and_steps_win() {
        let ratio = TrainerConfig {
            warmup_ratio: 0.1,
            ..TrainerConfig::default()
        };
        assert_eq!(ratio.warmup_for(95), 10);
        assert_eq!(ratio.warmup_for(100), 10);
        assert_eq!(ratio.warmup_for(0), 0);
        let both = TrainerConfig {
            warmup_steps: 3,
            ..ratio.clone()
        };
        assert_eq!(both.warmup_for(100), 3);
        for bad in [1.0, -0.1, f64::NAN] {
            let e = TrainerConfig {
                warmup_ratio: bad,
                ..TrainerConfig::default()
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains("warmup_ratio"), "{e}");
        }
    }

    #[test]
    fn training_arguments_names_are_aliases() {
        let c: TrainerConfig = toml::from_str(
            "num_train_epochs = 2\nper_device_train_batch_size = 4\nper_device_eval_batch_size = 8\n\
             lr_scheduler_type = \"cosine\"\nevaluation_strategy = \"epoch\"\nsave_strategy = \"no\"\n",
        )
        .unwrap();
        assert_eq!(
            (c.num_epochs, c.batch_size, c.eval_batch_size),
            (2, 4, Some(8))
        );
        assert_eq!(c.lr_scheduler, LrSchedule::Cosine);
        assert_eq!(
            (c.eval_strategy, c.save_strategy),
            (IntervalStrategy::Epoch, IntervalStrategy::No)
        );
    }

    #[test]
    fn validation_names_the_setting() {
        let e = TrainerConfig {
            learning_rate: -1.0,
            ..TrainerConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("learning_rate"));
        let e = TrainerConfig {
            batch_size: 0,
            ..TrainerConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("batch_size"));
        assert!(TrainerConfig::default().validate().is_ok());
    }
}
