//! # train-runner
//!
//! The fine-tuning loop of train-rs, generic over any burn autodiff backend:
//!
//! * [`TrainerConfig`]: the seed's defaults (batch 16, lr 2e-4, 3 epochs, eval every 50 steps,
//!   save every 1000, accumulation 1) and `transformers.TrainingArguments` semantics elsewhere
//!   (`max_steps` wins over epochs, linear / cosine / constant schedules with warm-up, AdamW
//!   with PyTorch's defaults, global gradient clipping at 1.0).
//! * [`AdamW`]: `torch.optim.AdamW` step for step, without weight decay on biases and norm
//!   weights (as `Trainer` groups them), its state keyed by Hugging Face parameter names.
//! * The loss of an optimizer step is the mean cross-entropy over **all** its label tokens,
//!   across every micro-batch of the accumulation — so packing, padding and accumulation do not
//!   change it.
//! * One loop for every [`Objective`]: supervised fine-tuning is [`NextToken`]; another
//!   objective brings its own micro-batch type and loss, and gets accumulation, clipping,
//!   schedules, data parallelism, checkpoints and exact resume from the same loop.
//! * Evaluation every `eval_steps` and at the end, best-checkpoint tracking, `save_total_limit`.
//! * Checkpoints (model directory with f32 master weights, optimizer moments, trainer state and
//!   data position) written atomically; [`Resume`] continues exactly where a run stopped.
//! * [`RunControl`] stops a run after the current step (with a checkpoint); a NaN loss ends it
//!   as `crashed` without touching earlier checkpoints; an [`OutputLock`] keeps two runs out of
//!   one directory; a [`TrainObserver`] sees start / every step / stop, whatever happens.
//!
//! ## Cargo features and backends
//!
//! The loop is generic over `burn::tensor::backend::AutodiffBackend`; the binary picks one
//! (e.g. `Autodiff<Flex>`). The features pick which backends `train-model` compiles: `cpu`
//! (default), `tch` (libtorch 2.9.0), `cuda`.
//!
//! ## Errors
//!
//! [`RunnerError`]: `Config` (a setting out of range, named), `Io` (with the path),
//! `Locked` (another live run holds the output directory; its pid is named),
//! `OutputNotEmpty` (the output directory holds an earlier run's checkpoints and neither
//! resume nor overwrite was asked for), `Checkpoint` (a checkpoint is missing, incomplete or
//! inconsistent with the model or data), and the `Model` / `Data` errors underneath. A NaN
//! loss is not an error: the run ends with [`RunStatus::Crashed`] and earlier checkpoints are
//! left untouched.
//!
//! ## Example
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::tensor::DType;
//! use train_data::Example;
//! use train_model::{CausalLm, ModelConfig};
//! use train_runner::{RunControl, RunStatus, TrainSetup, TrainerConfig, TrainObserver, run};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let json = serde_json::json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 16,
//!     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2});
//! let config = ModelConfig::from_json("config.json".as_ref(), &json)?;
//! let device = Default::default();
//! let model = CausalLm::<Autodiff<Flex>>::random(&config, 0.1, 1, DType::F32, &device)?;
//! let examples: Vec<Example> = (0..8)
//!     .map(|row| Example { row, input_ids: vec![1, 2, 3, 4, 5, 6], labels: vec![-100, -100, 3, 4, 5, 6] })
//!     .collect();
//! let out = tempfile::tempdir()?;
//! let setup = TrainSetup {
//!     model,
//!     raw_config: config.to_hf_json(),
//!     companions_from: out.path().join("no-source"), // a random model has no tokenizer files
//!     source_dtype: train_model::StorageDtype::F32,
//!     train: train_data::TrainRows::one_per_example(&examples),
//!     validation: Vec::new(),
//!     pad_id: 0,
//!     config: TrainerConfig { output_dir: out.path().to_path_buf(), batch_size: 4, learning_rate: 1e-2,
//!         num_epochs: 2, ..TrainerConfig::default() },
//!     data_fingerprint: "example".into(),
//!     overwrite: false,
//!     parallelism: train_runner::Parallelism::single(device),
//!     inputs: Vec::new(),
//! };
//! struct Quiet;
//! impl<B: train_model::FusedAutodiffBackend> TrainObserver<B> for Quiet {}
//! let summary = run(setup, None, &mut Quiet, &RunControl::new())?;
//! assert_eq!(summary.status, RunStatus::Completed);
//! assert_eq!(summary.global_step, 4); // 8 examples / batch 4 × 2 epochs
//! assert!(out.path().join("model.safetensors").exists());
//! # Ok(()) }
//! ```

mod batches;
mod checkpoint;
mod config;
mod control;
mod dpo;
mod error;
mod eval;
mod grpo;
mod lock;
mod objective;
mod observer;
mod optim;
mod parallel;
mod rewards;
mod run;
mod setup;
mod step;
mod train_loop;

pub use batches::{BatchPlan, batch_tensors};
pub use checkpoint::{
    CHECKSUMS_FILE, SET_ASIDE_DIR, TrainerState, checkpoint_run_id, latest_checkpoint,
    latest_intact_checkpoint, list_checkpoints, load_state, model_fingerprint, new_run_id,
    set_aside, verify_checkpoint,
};
pub use config::{IntervalStrategy, LrSchedule, TRAINER_KEY_ALIASES, TrainerConfig, limits};
pub use control::RunControl;
pub use dpo::{
    DPO_METRICS, Dpo, DpoConfig, DpoLossType, ORPO_METRICS, PairBatch, PairLogps, PairLoss,
    PairRow, completion_logps, dpo_pair_loss, run_dpo,
};
pub use error::{Result, RunnerError};
pub use eval::evaluate;
pub use grpo::{
    Grpo, GrpoConfig, GrpoLossType, GrpoRow, MAX_GENERATIONS, MAX_ITERATIONS, PromptBatch, Rollout,
    ScaleRewards, TokenLoss, group_advantages, grpo_token_loss, run_grpo, token_logps,
};
pub use lock::OutputLock;
pub use objective::{Collate, Contribution, Evaluation, NextToken, Objective};
pub use observer::{
    EvalRecord, MetricsObserver, Observers, RunInfo, RunStatus, RunSummary, StepRecord, TrainEvent,
    TrainObserver,
};
pub use optim::{AdamW, AdamWConfig, ParamTable, global_grad_norm, layer_norms};
pub use parallel::{Cluster, DataParallel, Parallelism, StepOutcome, parallel_step_gradients};
pub use rewards::{
    MAX_COMMAND_OUTPUT_BYTES, MAX_REGEX_BYTES, MAX_REWARD_FILE_BYTES, MAX_REWARD_FUNCTIONS,
    RewardConfig, RewardFunction, RewardInput, WeightedReward, parse_rewards, read_rewards,
};
pub use run::{Training, run, run_objective, save_adapter_dir, weigh_router_loss};
pub use setup::{Resume, TrainSetup, check_token_ids};
pub use step::step_gradients;
