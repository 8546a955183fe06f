//! `train grpo`: online reinforcement learning from reward functions (TRL's `GRPOTrainer`),
//! with every training flag of `train run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use train_data::{ChatTokenizer, Problem, ProblemKind, load_prompts};
use train_logits::{LogitsProcessor, ProcessorConfig, ProcessorContext};
use train_model::FusedAutodiffBackend;
use train_runner::{
    Grpo, GrpoConfig, GrpoLossType, GrpoRow, Parallelism, RunControl, RunSummary, ScaleRewards,
    TrainSetup, WeightedReward,
};

use crate::backend::{Placement, WithBackend};
use crate::run_cmd::{
    Launch, RunArgs, execute, observed_plain, reference_model, refuse_sft_options, row_location,
    skip_row,
};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpoLossArg {
    Grpo,
    DrGrpo,
    Dapo,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleRewardsArg {
    Group,
    Batch,
    None,
}

/// `train grpo`.
#[derive(Args, Debug, Clone)]
pub struct GrpoArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The reward functions: a TOML file of [[reward]] tables (built-in functions and
    /// external commands, each with a weight).
    #[arg(long, value_name = "FILE")]
    pub reward: PathBuf,
    /// Completions sampled per prompt (`--batch-size` counts prompts: a micro-batch trains on
    /// batch_size × num_generations completions).
    #[arg(long, default_value_t = GrpoConfig::default().num_generations)]
    pub num_generations: usize,
    /// Most tokens per completion (TRL's max_completion_length).
    #[arg(long, default_value_t = GrpoConfig::default().max_new_tokens)]
    pub max_new_tokens: usize,
    /// Sampling temperature (the trained log-probabilities use it too, as TRL's).
    #[arg(long, default_value_t = GrpoConfig::default().temperature)]
    pub temperature: f64,
    /// Keep only the k most likely tokens when sampling.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// A TOML file of [[processors]] applied to the logits before sampling (before the
    /// temperature).
    #[arg(long, value_name = "FILE")]
    pub processors: Option<PathBuf>,
    /// KL coefficient β to the reference model (0: no reference, TRL's default).
    #[arg(long, default_value_t = GrpoConfig::default().beta)]
    pub beta: f64,
    /// Clipping ε of the probability ratio.
    #[arg(long, default_value_t = GrpoConfig::default().epsilon)]
    pub epsilon: f64,
    /// Upper clipping ε (DAPO's clip-higher; default: --epsilon).
    #[arg(long)]
    pub epsilon_high: Option<f64>,
    /// How token losses are aggregated: dapo (TRL's default: over all tokens of the step),
    /// grpo (per completion, then over completions) or dr_grpo (over max_new_tokens).
    #[arg(long, value_enum, default_value_t = GrpoLossArg::Dapo)]
    pub loss_type: GrpoLossArg,
    /// Optimizer steps on each batch of completions (μ).
    #[arg(long, default_value_t = GrpoConfig::default().num_iterations)]
    pub num_iterations: usize,
    /// Rewards are divided by the standard deviation of their group, of the step, or not.
    #[arg(long, value_enum, default_value_t = ScaleRewardsArg::Group)]
    pub scale_rewards: ScaleRewardsArg,
    /// Do not multiply the KL term by the probability ratio (TRL's
    /// `use_bias_correction_kl=False`).
    #[arg(long)]
    pub no_bias_correction_kl: bool,
    /// The KL reference model (default: the starting weights of --model; for a LoRA run, the
    /// base model without the adapter). Used only with --beta > 0.
    #[arg(long, value_name = "DIR")]
    pub ref_model: Option<String>,
}

impl GrpoArgs {
    fn grpo_config(&self) -> GrpoConfig {
        GrpoConfig {
            num_generations: self.num_generations,
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            beta: self.beta,
            epsilon: self.epsilon,
            epsilon_high: self.epsilon_high,
            loss_type: match self.loss_type {
                GrpoLossArg::Grpo => GrpoLossType::Grpo,
                GrpoLossArg::DrGrpo => GrpoLossType::DrGrpo,
                GrpoLossArg::Dapo => GrpoLossType::Dapo,
            },
            num_iterations: self.num_iterations,
            scale_rewards: match self.scale_rewards {
                ScaleRewardsArg::Group => ScaleRewards::Group,
                ScaleRewardsArg::Batch => ScaleRewards::Batch,
                ScaleRewardsArg::None => ScaleRewards::None,
            },
            use_bias_correction_kl: !self.no_bias_correction_kl,
        }
    }

    /// The processors sampling applies: the file's, then temperature (when not 1), top-k,
    /// top-p.
    fn processor_configs(&self) -> Result<Vec<ProcessorConfig>> {
        crate::generate_cmd::sampling_processors(
            self.processors.as_deref(),
            (self.temperature != 1.0).then_some(self.temperature as f32),
            self.top_k,
            self.top_p,
        )
    }
}

/// Loads, checks and tokenizes the prompts of `config.dataset_path`: a prompt longer than
/// `max_length` is a problem of its row, reported and skipped or fatal per the error policy.
fn tokenized_prompts(
    config: &train_data::DatasetConfig,
    tok: &ChatTokenizer,
) -> Result<Vec<GrpoRow>> {
    let loaded = load_prompts(&config.dataset_path, &config.load)?;
    for p in &loaded.problems {
        errln!("{p}");
    }
    let mut out = Vec::with_capacity(loaded.prompts.len());
    for row in loaded.prompts {
        let prompt_ids = tok.encode_prompt(&row.prompt).with_context(|| {
            row.location
                .as_ref()
                .map_or_else(|| "a prompt".to_string(), ToString::to_string)
        })?;
        if prompt_ids.len() > config.max_length {
            let p = Problem::new(
                row_location(row.location.as_ref(), config),
                "prompt",
                ProblemKind::TooLong,
                format!(
                    "{} tokens, longer than max_length {} (a prompt is not truncated: raise \
                     --max-length, or drop such prompts with --truncation drop)",
                    prompt_ids.len(),
                    config.max_length
                ),
            );
            skip_row(config, p)?;
            continue;
        }
        out.push(GrpoRow {
            prompt_ids,
            row: Arc::new(row),
        });
    }
    Ok(out)
}

struct GrpoTraining<'a> {
    args: &'a GrpoArgs,
    launch: Launch,
    prompts: Vec<GrpoRow>,
    rewards: Vec<WeightedReward>,
    processors: Vec<ProcessorConfig>,
    fingerprint: String,
    control: RunControl,
    alerts: train_monitor::AlertConfig,
}

impl WithBackend for GrpoTraining<'_> {
    type Output = RunSummary;

    fn run<B: FusedAutodiffBackend>(self, placement: Placement<B>) -> Result<RunSummary> {
        let device = placement.main;
        let args = &self.args.run;
        let source = self.launch.source::<B>(&args.compute, &device)?;
        let tok = &self.launch.tok;
        let pad_id = tok.pad_id();
        let grpo = self.args.grpo_config();
        // The KL reference: the starting weights (for a resumed run too), or --ref-model. For
        // a LoRA run the starting weights are the base, whose frozen tensors the policy shares.
        let reference = if grpo.beta > 0.0 {
            Some(reference_model(
                self.args.ref_model.as_deref(),
                &args.compute,
                &source.model,
                &device,
            )?)
        } else {
            None
        };
        let ends = train_logits::end_ids(&self.launch.model_dir, &source.config.eos_token_ids, tok);
        let ctx = ProcessorContext {
            tokenizer: Some(tok.tokenizer()),
            end_ids: &ends,
        };
        let processors: Vec<Box<dyn LogitsProcessor>> =
            train_logits::build_processors(&self.processors, &ctx).with_context(|| match &self
                .args
                .processors
            {
                Some(p) => format!("processors of {}", p.display()),
                None => "processors".to_string(),
            })?;
        let context = args
            .compute
            .describe::<B>(&device, source.config.architecture.model_type());
        let model = self.launch.model(&args.compute, &device, source.model)?;
        let objective = Grpo::<B>::new(
            grpo,
            &self.rewards,
            tok.tokenizer(),
            ends,
            processors,
            reference,
            self.launch.trainer.seed,
        );
        // Ctrl-C (or `train control stop`) abandons the step's sampling at once; over several
        // machines a stop is agreed at a step's all-reduce instead.
        let objective = if self.launch.cluster.is_none() {
            objective.with_stop(self.control.flag())
        } else {
            objective
        };
        let output = self.launch.trainer.output_dir.clone();
        let setup = TrainSetup {
            model,
            raw_config: source.raw_config,
            companions_from: source.dir.clone(),
            source_dtype: source.source_dtype,
            train: train_data::TrainRows::default(),
            validation: Vec::new(),
            pad_id,
            config: self.launch.trainer.clone(),
            data_fingerprint: self.fingerprint,
            overwrite: args.yes,
            parallelism: Parallelism::new(placement.workers, self.launch.cluster.clone())?,
            inputs: vec![self.launch.model_dir.clone()],
        };
        observed_plain(args, output, self.alerts, context, |observers| {
            train_runner::run_grpo(
                setup,
                self.prompts,
                &objective,
                self.launch.resume.as_ref(),
                observers,
                &self.control,
            )
        })
    }
}

/// `train grpo`.
pub fn grpo(args: &GrpoArgs) -> Result<ExitCode> {
    let run = &args.run;
    let data = run.data.config()?;
    if data.packing == Some(true) {
        bail!("--packing: GRPO samples its completions; there is nothing to pack");
    }
    refuse_sft_options(&data, "train grpo", "it trains on its own completions")?;
    if data.eval_dataset_path.is_some() {
        bail!(
            "--eval-dataset: `train grpo` does not evaluate (it is scored by its rewards); \
             every prompt of --dataset is trained on"
        );
    }
    // Every prompt is trained on: GRPO is scored by its rewards (`reward` in metrics.jsonl),
    // not by a validation loss. A split other than the default says so.
    if data.validation_split > 0.0
        && data.validation_split != train_data::DatasetConfig::default().validation_split
    {
        errln!("note: --validation-split is not used by `train grpo` (every prompt is trained on)");
    }
    args.grpo_config().validate()?;
    let rewards = train_runner::read_rewards(&args.reward)?;
    let processors = args.processor_configs()?;
    let launch = Launch::new(run)?;
    let fingerprint = train_data::cache_key(&data, &launch.tok)?;
    let prompts = tokenized_prompts(&data, &launch.tok)?;
    if prompts.is_empty() {
        bail!(
            "{}: no prompts left after loading",
            data.dataset_path.display()
        );
    }
    let (control, alerts, watcher) = launch.arm(run)?;
    let work = GrpoTraining {
        args,
        launch,
        prompts,
        rewards,
        processors,
        fingerprint,
        control,
        alerts,
    };
    execute(run, watcher, work)
}
