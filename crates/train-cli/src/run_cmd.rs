//! `train` / `train run` (fine-tune) and `train eval`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use train_data::{ChatTokenizer, DatasetConfig, Prepared};
use train_model::FusedAutodiffBackend;
use train_model::{
    AttentionImpl, LoadOptions, LoraConfig, Precision, StorageDtype, load_pretrained,
};
use train_runner::{
    IntervalStrategy, LrSchedule, MetricsObserver, Observers, Parallelism, Resume, RunControl,
    RunStatus, RunSummary, TrainSetup, TrainerConfig, evaluate, latest_intact_checkpoint,
};

use crate::DataArgs;
use crate::backend::{BackendArg, Placement, WithBackend, dispatch};
use crate::config_file::Given;
use crate::control::ControlWatcher;
use crate::monitor::Monitor;
use crate::progress::Progress;

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum PrecisionArg {
    Auto,
    Fp32,
    Bf16,
    Fp16,
}

impl PrecisionArg {
    fn precision(self) -> Precision {
        match self {
            Self::Auto => Precision::Auto,
            Self::Fp32 => Precision::Fp32,
            Self::Bf16 => Precision::Bf16,
            Self::Fp16 => Precision::Fp16,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum SchedulerArg {
    Constant,
    Linear,
    Cosine,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportTo {
    Jsonl,
    Tensorboard,
    All,
    None,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum StrategyArg {
    Steps,
    Epoch,
    No,
}

impl StrategyArg {
    fn strategy(self) -> IntervalStrategy {
        match self {
            Self::Steps => IntervalStrategy::Steps,
            Self::Epoch => IntervalStrategy::Epoch,
            Self::No => IntervalStrategy::No,
        }
    }
}

impl From<IntervalStrategy> for StrategyArg {
    fn from(s: IntervalStrategy) -> Self {
        match s {
            IntervalStrategy::Steps => Self::Steps,
            IntervalStrategy::Epoch => Self::Epoch,
            IntervalStrategy::No => Self::No,
        }
    }
}

impl std::fmt::Display for StrategyArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.to_possible_value().ok_or(std::fmt::Error)?;
        f.write_str(v.get_name())
    }
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum AttentionArg {
    Auto,
    Fused,
    Standard,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum DtypeArg {
    Fp32,
    Bf16,
    Fp16,
}

impl DtypeArg {
    pub(crate) fn storage(self) -> StorageDtype {
        match self {
            Self::Fp32 => StorageDtype::F32,
            Self::Bf16 => StorageDtype::Bf16,
            Self::Fp16 => StorageDtype::F16,
        }
    }
}

/// A count flag: a whole number from 1 to `MAX`, checked when it is parsed, so that no flag can
/// overflow a size or ask for terabytes (clap names the flag in the message).
pub(crate) fn count<const MAX: usize>(s: &str) -> std::result::Result<usize, String> {
    let v: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if v == 0 || v > MAX {
        return Err(format!("{v} is outside 1..={MAX}"));
    }
    Ok(v)
}

/// `--max-length`, checked by the data side's one check when it is parsed.
pub(crate) fn max_length(s: &str) -> std::result::Result<usize, String> {
    let v: usize = s
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    train_data::check_max_length(v).map_err(|e| e.to_string())?;
    Ok(v)
}

/// Like [`count`], 0 allowed.
pub(crate) fn count0<const MAX: usize>(s: &str) -> std::result::Result<usize, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    count::<MAX>(s)
}

use train_runner::limits;

/// Where and how to compute.
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// Compute precision: bf16 on GPUs that support it and fp32 on CPU (auto), or forced.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    pub precision: PrecisionArg,
    /// `--precision bf16` (the `TrainingArguments` flag).
    #[arg(long, conflicts_with_all = ["precision", "fp16"])]
    pub bf16: bool,
    /// `--precision fp16` (the `TrainingArguments` flag).
    #[arg(long, conflicts_with = "precision")]
    pub fp16: bool,
    /// burn backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
    /// Device of the backend: `cpu`, `cuda`, `cuda:N` (tch) or a GPU index (cuda).
    #[arg(long)]
    pub device: Option<String>,
    /// Attention kernel.
    #[arg(long, value_enum, default_value_t = AttentionArg::Auto)]
    pub attention: AttentionArg,
}

impl ComputeArgs {
    /// What is trained and where, for the start line: the model family, backend, device and
    /// the precision computed in.
    pub(crate) fn describe<B: burn::tensor::backend::Backend>(
        &self,
        device: &B::Device,
        model_type: &str,
    ) -> String {
        let precision = match self.load_options(false).precision.resolve::<B>(device) {
            Ok(d) => format!("{d:?}").to_ascii_lowercase(),
            Err(_) => "?".into(),
        };
        let backend = format!("{:?}", self.backend).to_ascii_lowercase();
        format!("{model_type}, backend {backend}, device {device:?}, {precision}")
    }

    pub(crate) fn load_options(&self, master_weights: bool) -> LoadOptions {
        let precision = if self.bf16 {
            PrecisionArg::Bf16
        } else if self.fp16 {
            PrecisionArg::Fp16
        } else {
            self.precision
        };
        LoadOptions {
            precision: precision.precision(),
            attention: match self.attention {
                AttentionArg::Auto => AttentionImpl::Auto,
                AttentionArg::Fused => AttentionImpl::Fused,
                AttentionArg::Standard => AttentionImpl::Standard,
            },
            f32_master_weights: master_weights,
        }
    }
}

/// `train` / `train run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Output directory: checkpoints, metrics.jsonl and the final model.
    #[arg(long, visible_alias = "output-dir", default_value_os_t = trainer_defaults().output_dir)]
    pub output: PathBuf,
    /// Directory of `training_status.json` (default: `<output>/status`).
    #[arg(long, value_name = "DIR")]
    pub status_dir: Option<PathBuf>,
    /// Epochs over the training split.
    #[arg(long, visible_alias = "num-train-epochs", default_value_t = trainer_defaults().num_epochs, value_parser = count::<{ limits::MAX_EPOCHS }>)]
    pub epochs: usize,
    /// Optimizer steps (wins over --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples (or packed rows) per micro-batch.
    #[arg(long, visible_aliases = ["per-device-train-batch-size", "micro-batch-size"], default_value_t = trainer_defaults().batch_size, value_parser = count::<{ limits::MAX_BATCH_SIZE }>)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, visible_alias = "gradient-accumulation-steps", default_value_t = trainer_defaults().gradient_accumulation_steps, value_parser = count::<{ limits::MAX_GRADIENT_ACCUMULATION }>)]
    pub gradient_accumulation: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = trainer_defaults().learning_rate)]
    pub learning_rate: f64,
    /// Learning-rate schedule (after the warm-up).
    #[arg(long, visible_alias = "lr-scheduler-type", value_enum, default_value_t = SchedulerArg::from(trainer_defaults().lr_scheduler))]
    pub lr_scheduler: SchedulerArg,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = trainer_defaults().warmup_steps)]
    pub warmup_steps: usize,
    /// Linear warm-up over this fraction of the run's steps (rounded up), when --warmup-steps
    /// is 0.
    #[arg(long, default_value_t = trainer_defaults().warmup_ratio)]
    pub warmup_ratio: f64,
    /// AdamW weight decay (not on biases and norm weights).
    #[arg(long, default_value_t = trainer_defaults().weight_decay)]
    pub weight_decay: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = trainer_defaults().adam_beta1)]
    pub adam_beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = trainer_defaults().adam_beta2)]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = trainer_defaults().adam_epsilon)]
    pub adam_epsilon: f64,
    /// Global gradient-norm clipping (0 disables).
    #[arg(long, default_value_t = trainer_defaults().max_grad_norm)]
    pub max_grad_norm: f64,
    /// Weight of a mixture-of-experts router's load-balancing loss in the training loss, as
    /// TRL's `router_aux_loss_coef` (default: the model's own `router_aux_loss_coef`; 0 leaves
    /// it out). A dense model refuses a non-zero weight.
    #[arg(long, value_name = "COEF")]
    pub router_aux_loss_coef: Option<f64>,
    /// Evaluate every this many steps (and at the end), with --eval-strategy steps.
    #[arg(long, default_value_t = trainer_defaults().eval_steps)]
    pub eval_steps: usize,
    /// When to evaluate: every --eval-steps, at the end of every epoch, or never.
    #[arg(long, visible_alias = "evaluation-strategy", value_enum, default_value_t = StrategyArg::from(trainer_defaults().eval_strategy))]
    pub eval_strategy: StrategyArg,
    /// Write a row of metrics.jsonl every this many steps (and after the last): the loss
    /// averaged over them, tokens/s over their time.
    #[arg(long, default_value_t = trainer_defaults().logging_steps, value_parser = count::<{ usize::MAX }>)]
    pub logging_steps: usize,
    /// Micro-batch size of evaluation (default: --batch-size).
    #[arg(long, visible_alias = "per-device-eval-batch-size", value_parser = count::<{ limits::MAX_BATCH_SIZE }>)]
    pub eval_batch_size: Option<usize>,
    /// Save a checkpoint every this many steps (and at the end), with --save-strategy steps.
    #[arg(long, default_value_t = trainer_defaults().save_steps)]
    pub save_steps: usize,
    /// When to save a checkpoint: every --save-steps, at the end of every epoch, or never (a
    /// stop on request still saves one).
    #[arg(long, value_enum, default_value_t = StrategyArg::from(trainer_defaults().save_strategy))]
    pub save_strategy: StrategyArg,
    /// Keep at most this many checkpoints (the best is always kept).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Dtype of the final model (default: the source checkpoint's).
    #[arg(long, value_enum)]
    pub save_dtype: Option<DtypeArg>,
    /// Visit the training data in file order.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping them
    /// (transformers' `gradient_checkpointing`): a step holds one layer's activations instead of
    /// every layer's, for one more forward pass of compute; the same gradients.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Train LoRA adapters of this rank on the frozen model instead of every weight; the output
    /// and checkpoints are then PEFT adapter directories.
    #[arg(long, value_name = "R", value_parser = count::<{ limits::MAX_LORA_RANK }>)]
    pub lora_r: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / r (PEFT's default 8).
    #[arg(long, default_value_t = LoraConfig::default().alpha, requires = "lora_r")]
    pub lora_alpha: f64,
    /// Dropout on the adapters' input while training.
    #[arg(long, default_value_t = LoraConfig::default().dropout, requires = "lora_r")]
    pub lora_dropout: f64,
    /// Projections that get adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
    /// down_proj; Phi-3's fused qkv_proj, gate_up_proj; or all-linear); repeat or separate
    /// with commas. On Qwen3-MoE, as PEFT: gate_proj with up_proj and down_proj adapt the
    /// experts' stacked weights, gate the router.
    #[arg(long, visible_alias = "lora-target-modules", value_delimiter = ',', default_values_t = LoraConfig::default().target_modules, requires = "lora_r")]
    pub lora_target: Vec<String>,
    /// Scale the adapters by alpha / √r (rsLoRA).
    #[arg(long, requires = "lora_r")]
    pub lora_rslora: bool,
    /// Data-parallel workers: each runs --batch-size × --gradient-accumulation examples of every
    /// step on its own model replica and the gradients are summed (burn's collective
    /// all-reduce), so the global batch is batch size × accumulation × devices.
    /// On GPUs, one worker per GPU from --device (`--device cuda:0 --devices 4`: GPUs 0-3), or
    /// one per device of a list (`--device cuda:0,cuda:2 --devices 2`).
    #[arg(long, default_value_t = 1, value_parser = count::<{ limits::MAX_DEVICES }>)]
    pub devices: usize,
    /// Machines in a multi-machine run: each runs the same command with its own --node-rank and
    /// --node-address, and the global batch is multiplied by the number of machines.
    #[arg(long, default_value_t = 1, value_parser = count::<{ limits::MAX_NODES }>)]
    pub nodes: usize,
    /// This machine's rank in a multi-machine run, 0 to --nodes − 1.
    #[arg(long, requires_all = ["orchestrator", "node_address"])]
    pub node_rank: Option<usize>,
    /// The orchestrator (`train orchestrator`) of a multi-machine run, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", requires = "node_rank")]
    pub orchestrator: Option<String>,
    /// Where the other machines reach this one, HOST:PORT (it listens on that port).
    #[arg(long, value_name = "HOST:PORT", requires = "node_rank")]
    pub node_address: Option<String>,
    /// Validation prompts answered greedily for the live previews (every max(10, eval_steps/10)
    /// steps) and the evolution tracker (steps 0, 10, 25, 50, 100, …); 0 turns both off.
    #[arg(long, default_value_t = 3, value_parser = count0::<1024>)]
    pub preview_prompts: usize,
    /// Longest preview answer (in any case at most the golden answer's length + 8 tokens).
    #[arg(long, default_value_t = 64, value_parser = count0::<65536>)]
    pub preview_max_new_tokens: usize,
    /// Alert thresholds (TOML keys: min_throughput_ratio, baseline_steps, max_eval_gap,
    /// max_loss_variance, min_available_bytes; defaults 0.6, 5, 0.3, 1.0, 512 MiB).
    #[arg(long, value_name = "FILE.toml")]
    pub alerts: Option<PathBuf>,
    /// Logits processors (TOML `[[processors]]`) for the previews.
    #[arg(long, value_name = "FILE.toml")]
    pub processors: Option<PathBuf>,
    /// Do not evaluate.
    #[arg(long)]
    pub skip_validation: bool,
    /// Continue from a checkpoint (default: the newest in --output).
    #[arg(long, num_args = 0..=1, default_missing_value = "", value_name = "DIR")]
    pub resume: Option<String>,
    /// Never ask: start over in an output directory that holds an earlier run.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Where the metrics go besides metrics.jsonl (always written): `tensorboard` (event files
    /// in OUTPUT/runs: losses, learning rate, gradient norm, tokens/s, evaluations, previews),
    /// `all` (the same), `jsonl` or `none` (nothing more). Repeat or separate with commas.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "jsonl")]
    pub report_to: Vec<ReportTo>,
    /// The `[trainer]` section of the --config file.
    #[arg(skip)]
    pub section: Option<TrainerConfig>,
    /// The flags given (the others keep the section's value or the default).
    #[arg(skip)]
    pub given: Given,
}

/// The trainer's defaults (the flags show them; the one place they are written is
/// `TrainerConfig::default`).
fn trainer_defaults() -> TrainerConfig {
    TrainerConfig::default()
}

impl From<LrSchedule> for SchedulerArg {
    fn from(s: LrSchedule) -> Self {
        match s {
            LrSchedule::Constant => Self::Constant,
            LrSchedule::Linear => Self::Linear,
            LrSchedule::Cosine => Self::Cosine,
        }
    }
}

impl std::fmt::Display for SchedulerArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.to_possible_value().ok_or(std::fmt::Error)?;
        f.write_str(v.get_name())
    }
}

impl RunArgs {
    /// The directory of TensorBoard's event files, when --report-to asks for them.
    pub(crate) fn tensorboard_dir(&self, output: &Path) -> Option<PathBuf> {
        self.report_to
            .iter()
            .any(|r| matches!(r, ReportTo::Tensorboard | ReportTo::All))
            .then(|| output.join("runs"))
    }

    /// Binds the --config file's sections and the flags given in `matches` (this command's).
    pub(crate) fn bind(
        &mut self,
        file: &crate::config_file::RunConfig,
        matches: &clap::ArgMatches,
    ) {
        self.data.bind(file.data.as_ref(), matches);
        self.section = file.trainer.clone();
        self.given = Given::new(matches);
    }

    /// This machine's place in a multi-machine run (`None` with one machine), checked.
    pub(crate) fn cluster(&self) -> Result<Option<train_runner::Cluster>> {
        let (Some(node_rank), Some(orchestrator), Some(node_address)) = (
            self.node_rank,
            self.orchestrator.clone(),
            self.node_address.clone(),
        ) else {
            if self.nodes > 1 {
                bail!(
                    "--nodes {}: a run over several machines needs this machine's --node-rank, \
                     --orchestrator and --node-address",
                    self.nodes
                );
            }
            return Ok(None);
        };
        let cluster = train_runner::Cluster {
            nodes: self.nodes,
            node_rank,
            orchestrator,
            node_address,
        };
        cluster.validate()?;
        Ok(Some(cluster))
    }

    /// The trainer's configuration, built once: the `[trainer]` section (or the defaults),
    /// then every flag given.
    pub(crate) fn trainer_config(&self) -> TrainerConfig {
        let g = &self.given;
        let mut t = self.section.clone().unwrap_or_default();
        macro_rules! flag {
            ($id:literal, $field:ident, $value:expr) => {
                if g.has($id) {
                    t.$field = $value;
                }
            };
        }
        flag!("output", output_dir, self.output.clone());
        flag!("batch_size", batch_size, self.batch_size);
        flag!("learning_rate", learning_rate, self.learning_rate);
        flag!("epochs", num_epochs, self.epochs);
        flag!("max_steps", max_steps, self.max_steps);
        flag!("eval_steps", eval_steps, self.eval_steps);
        flag!("save_steps", save_steps, self.save_steps);
        flag!(
            "gradient_accumulation",
            gradient_accumulation_steps,
            self.gradient_accumulation
        );
        flag!("warmup_steps", warmup_steps, self.warmup_steps);
        flag!("warmup_ratio", warmup_ratio, self.warmup_ratio);
        flag!("logging_steps", logging_steps, self.logging_steps);
        flag!(
            "eval_strategy",
            eval_strategy,
            self.eval_strategy.strategy()
        );
        flag!(
            "save_strategy",
            save_strategy,
            self.save_strategy.strategy()
        );
        flag!(
            "lr_scheduler",
            lr_scheduler,
            match self.lr_scheduler {
                SchedulerArg::Constant => LrSchedule::Constant,
                SchedulerArg::Linear => LrSchedule::Linear,
                SchedulerArg::Cosine => LrSchedule::Cosine,
            }
        );
        flag!("weight_decay", weight_decay, self.weight_decay);
        flag!("adam_beta1", adam_beta1, self.adam_beta1);
        flag!("adam_beta2", adam_beta2, self.adam_beta2);
        flag!("adam_epsilon", adam_epsilon, self.adam_epsilon);
        flag!("max_grad_norm", max_grad_norm, self.max_grad_norm);
        flag!(
            "router_aux_loss_coef",
            router_aux_loss_coef,
            self.router_aux_loss_coef
        );
        flag!("gradient_checkpointing", gradient_checkpointing, true);
        flag!("seed", seed, self.data.seed);
        flag!("no_shuffle", shuffle, false);
        flag!("save_total_limit", save_total_limit, self.save_total_limit);
        flag!("skip_validation", skip_validation, true);
        flag!("eval_batch_size", eval_batch_size, self.eval_batch_size);
        flag!(
            "save_dtype",
            save_dtype,
            self.save_dtype.map(DtypeArg::storage)
        );
        if let Some(r) = self.lora_r.filter(|_| g.has("lora_r")) {
            let mut lora = t.lora.take().unwrap_or_default();
            lora.r = r;
            if g.has("lora_alpha") {
                lora.alpha = self.lora_alpha;
            }
            if g.has("lora_dropout") {
                lora.dropout = self.lora_dropout;
            }
            if g.has("lora_target") {
                lora.target_modules = self.lora_target.clone();
            }
            if g.has("lora_rslora") {
                lora.use_rslora = true;
            }
            t.lora = Some(lora);
        }
        t
    }
}

/// The data of a run, tokenized through the cache in `<output>/.cache/data` (or --cache-dir).
fn prepare_data(config: &DatasetConfig, tok: &ChatTokenizer, cache: &Path) -> Result<Prepared> {
    let (prepared, hit) = train_data::prepare_cached(config, tok, cache)?;
    if hit {
        errln!(
            "tokenized dataset read from the cache ({})",
            cache.display()
        );
    }
    for p in &prepared.problems {
        errln!("{p}");
    }
    Ok(prepared)
}

struct Training<'a> {
    args: &'a RunArgs,
    launch: Launch,
    prepared: Prepared,
    control: RunControl,
    alerts: train_monitor::AlertConfig,
}

impl WithBackend for Training<'_> {
    type Output = RunSummary;

    fn run<B: FusedAutodiffBackend>(self, placement: Placement<B>) -> Result<RunSummary> {
        let device = placement.main;
        let train_model::Pretrained {
            model: source_model,
            config: source_config,
            raw_config,
            dir: source_dir,
            source_dtype,
            ..
        } = self.launch.source::<B>(&self.args.compute, &device)?;
        let model = self
            .launch
            .model(&self.args.compute, &device, source_model)?;
        let Launch {
            cluster,
            trainer,
            model_dir,
            tok,
            resume,
        } = self.launch;
        let Prepared {
            train: train_examples,
            validation,
            rows,
            fingerprint,
            ..
        } = self.prepared;
        let probe_rows = if validation.is_empty() {
            &train_examples
        } else {
            &validation
        };
        let probes = crate::inspect::probes(probe_rows, &tok, self.args.preview_prompts);
        // The loop trains on the rows; the examples they were built from are not needed.
        drop(train_examples);
        let end_ids = train_logits::end_ids(&model_dir, &source_config.eos_token_ids, &tok);
        let ctx = train_logits::ProcessorContext {
            tokenizer: Some(tok.tokenizer()),
            end_ids: &end_ids,
        };
        // The one factory: a library user's registry with their own types works the same way.
        let processors = match &self.args.processors {
            Some(p) => {
                train_logits::read_processors(&train_logits::ProcessorRegistry::new(), p, &ctx)?
            }
            None => Vec::new(),
        };
        let start_step = resume.as_ref().map_or(0, |r| r.state.global_step);
        let output = trainer.output_dir.clone();
        let eval_steps = trainer.eval_steps;
        let trainer_logging_steps = trainer.logging_steps;
        let context = self
            .args
            .compute
            .describe::<B>(&device, source_config.architecture.model_type());
        let settings = report_settings(
            &context,
            &model_dir,
            self.args.data.config().ok().as_ref(),
            &trainer,
        );
        let setup = TrainSetup {
            model,
            raw_config,
            companions_from: source_dir.clone(),
            source_dtype,
            train: rows,
            validation,
            pad_id: tok.pad_id(),
            config: trainer,
            data_fingerprint: fingerprint,
            overwrite: self.args.yes,
            parallelism: Parallelism::new(placement.workers, cluster)?,
            inputs: vec![model_dir.clone()],
        };
        let mut progress = Progress::new().with_context(context);
        let status_dir = self
            .args
            .status_dir
            .clone()
            .unwrap_or_else(|| output.join("status"));
        let inspector = crate::inspect::Inspector::new(
            &tok,
            probes,
            processors,
            end_ids,
            train_monitor::preview_interval(eval_steps),
            self.args.preview_max_new_tokens,
            start_step,
        );
        let mut monitor = Monitor::new(status_dir, output.clone(), self.alerts)
            .reporting(self.args.tensorboard_dir(&output), trainer_logging_steps)
            .with_settings(settings)
            .with_inspector(inspector);
        let summary = observed(&mut monitor, &mut progress, |observers| {
            train_runner::run(setup, resume.as_ref(), observers, &self.control)
        });
        if let Some((spent, wall, steps)) = monitor.overhead {
            errln!(
                "monitoring (status file, alerts, previews, layer monitor, evolution, plots, report): {:.1} ms over {steps} steps, {:.2} % of the run",
                spent.as_secs_f64() * 1e3,
                100.0 * spent.as_secs_f64() / wall.as_secs_f64().max(1e-9)
            );
        }
        summary
    }
}

/// Runs `run` with the observers of every training command: `monitor` (first: the status file
/// is current before progress lines announce a change, and it reads a resumed run's past rows
/// at the start, before they are appended to), `metrics.jsonl` and `progress`; a failure to
/// write `metrics.jsonl` is reported, not fatal.
pub(crate) fn observed<B: FusedAutodiffBackend>(
    monitor: &mut Monitor<'_>,
    progress: &mut Progress,
    run: impl FnOnce(&mut Observers<'_, B>) -> train_runner::Result<RunSummary>,
) -> Result<RunSummary> {
    let mut metrics = MetricsObserver::new();
    let mut observers = Observers::default();
    observers.push(monitor);
    observers.push(&mut metrics);
    observers.push(progress);
    let summary = run(&mut observers);
    drop(observers);
    if let Some(e) = metrics.error() {
        errln!("warning: metrics.jsonl: {e} (training went on without it)");
    }
    Ok(summary?)
}

/// The settings a report shows: what is trained where (`context`), the model, and every key
/// of the data and trainer configurations (nested ones as `lora.r`).
pub(crate) fn report_settings(
    context: &str,
    model: &Path,
    data: Option<&DatasetConfig>,
    trainer: &TrainerConfig,
) -> Vec<(String, String)> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            serde_json::Value::Null => out.push((prefix.to_string(), "–".into())),
            serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut out = vec![
        ("run".to_string(), context.to_string()),
        ("model".to_string(), model.display().to_string()),
    ];
    if let Some(d) = data {
        flatten(
            "data",
            &serde_json::to_value(d).unwrap_or_default(),
            &mut out,
        );
    }
    flatten(
        "trainer",
        &serde_json::to_value(trainer).unwrap_or_default(),
        &mut out,
    );
    out
}

/// [`observed`] with a plain monitor (no previews) writing under `args.status_dir` (default
/// `output/status`): the observers of `train dpo` and `train grpo`.
pub(crate) fn observed_plain<B: FusedAutodiffBackend>(
    args: &RunArgs,
    output: PathBuf,
    alerts: train_monitor::AlertConfig,
    context: String,
    run: impl FnOnce(&mut Observers<'_, B>) -> train_runner::Result<RunSummary>,
) -> Result<RunSummary> {
    let status_dir = args
        .status_dir
        .clone()
        .unwrap_or_else(|| output.join("status"));
    let tensorboard = args.tensorboard_dir(&output);
    let trainer = args.trainer_config();
    let data = args.data.config().ok();
    let model = PathBuf::from(args.data.model_name());
    let settings = report_settings(&context, &model, data.as_ref(), &trainer);
    let mut monitor = Monitor::new(status_dir, output, alerts)
        .reporting(tensorboard, trainer.logging_steps)
        .with_settings(settings);
    observed(
        &mut monitor,
        &mut Progress::new().with_context(context),
        run,
    )
}

/// The reference model of a preference or RL run: `--ref-model` (loaded without master
/// weights) or the starting weights of `source`; its vocabulary must be the model's.
pub(crate) fn reference_model<B: FusedAutodiffBackend>(
    ref_model: Option<&str>,
    compute: &ComputeArgs,
    source: &train_model::CausalLm<B>,
    device: &burn::tensor::Device<B>,
) -> Result<train_model::CausalLm<B::InnerBackend>> {
    use burn::module::AutodiffModule;
    let reference = match ref_model {
        Some(r) => {
            let dir = crate::registry()?.resolve(r)?;
            train_model::load_pretrained::<B::InnerBackend>(
                &dir,
                &compute.load_options(false),
                device,
            )
            .with_context(|| format!("loading the reference model {}", dir.display()))?
            .model
        }
        None => source.valid(),
    };
    if reference.config.vocab_size != source.config.vocab_size {
        bail!(
            "the reference model's vocabulary ({}) differs from the model's ({})",
            reference.config.vocab_size,
            source.config.vocab_size
        );
    }
    Ok(reference)
}

/// Refuses the data options of supervised fine-tuning that `command` does not apply (it does
/// not transform or mask its rows: `why` says what it trains on instead).
pub(crate) fn refuse_sft_options(
    data: &train_data::DatasetConfig,
    command: &str,
    why: &str,
) -> Result<()> {
    let unused = [
        (data.apply_thinking_pattern, "--thinking-pattern"),
        (data.apply_stop_pattern, "--stop-pattern"),
        (data.system_prompt.is_some(), "--system-prompt"),
        (!data.transforms.is_empty(), "--transforms"),
        (
            data.label_mode != train_data::LabelMode::default(),
            "--label-mode",
        ),
    ];
    if let Some((_, flag)) = unused.iter().find(|(given, _)| *given) {
        bail!(
            "{flag}: `{command}` does not transform its data ({why}); transform the data file first"
        );
    }
    Ok(())
}

/// A router's loss weight needs a router: a dense model refuses a non-zero one before the data
/// is read (the runner checks it again, for library users).
fn check_router_weight(trainer: &TrainerConfig, model_dir: &Path) -> Result<()> {
    if !trainer.router_aux_loss_coef.is_some_and(|c| c != 0.0) {
        return Ok(());
    }
    let dir = if train_model::is_adapter_dir(model_dir) && !model_dir.join("config.json").is_file()
    {
        let adapter = train_model::read_adapter_config(model_dir)?;
        train_model::resolve_base_model(model_dir, adapter.base_model.as_deref())?
    } else {
        model_dir.to_path_buf()
    };
    let (config, _) = train_model::ModelConfig::from_file(&dir.join("config.json"))?;
    if config.moe.is_none() {
        bail!(
            "router_aux_loss_coef (--router-aux-loss-coef): {} is not a mixture of experts: it \
             has no router whose load-balancing loss could be weighted",
            dir.display()
        );
    }
    Ok(())
}

/// What every training command (`train`, `train dpo`, `train grpo`) settles before its data:
/// the trainer settings (checked), the machines, the model and its tokenizer, the checkpoint
/// resumed, and an output directory that is none of the inputs.
pub(crate) struct Launch {
    pub(crate) cluster: Option<train_runner::Cluster>,
    pub(crate) trainer: TrainerConfig,
    pub(crate) model_dir: PathBuf,
    pub(crate) tok: ChatTokenizer,
    pub(crate) resume: Option<Resume>,
}

impl Launch {
    pub(crate) fn new(args: &RunArgs) -> Result<Self> {
        let trainer = args.trainer_config();
        trainer.validate()?;
        let cluster = args.cluster()?;
        let (model_dir, tok) = crate::tokenizer_for(&args.data.model)?;
        check_router_weight(&trainer, &model_dir)?;
        let resume = resolve_resume(args.resume.as_deref(), &trainer.output_dir)?;
        check_output(&trainer.output_dir, &model_dir, resume.as_ref())?;
        Ok(Self {
            cluster,
            trainer,
            model_dir,
            tok,
            resume,
        })
    }

    /// Once the data is ready: the stop signals, the `--alerts` thresholds and the control-file
    /// watcher of the output directory.
    pub(crate) fn arm(
        &self,
        args: &RunArgs,
    ) -> Result<(RunControl, train_monitor::AlertConfig, ControlWatcher)> {
        let control = stop_on_signals()?;
        let alerts = read_alerts(args.alerts.as_deref())?;
        let watcher = ControlWatcher::start(&self.trainer.output_dir, &control);
        Ok((control, alerts, watcher))
    }

    /// On the backend: the model as `--model` has it (the source of its configuration and
    /// companion files, and of a reference), its tokenizer checked against it.
    pub(crate) fn source<B: FusedAutodiffBackend>(
        &self,
        compute: &ComputeArgs,
        device: &burn::tensor::Device<B>,
    ) -> Result<train_model::Pretrained<B>> {
        let source = load_pretrained::<B>(&self.model_dir, &compute.load_options(true), device)
            .with_context(|| format!("loading {}", self.model_dir.display()))?;
        crate::check_tokenizer_fits(&self.tok, &self.model_dir, source.config.vocab_size)?;
        Ok(source)
    }

    /// The model to train: the resumed checkpoint's, or `source`.
    pub(crate) fn model<B: FusedAutodiffBackend>(
        &self,
        compute: &ComputeArgs,
        device: &burn::tensor::Device<B>,
        source: train_model::CausalLm<B>,
    ) -> Result<train_model::CausalLm<B>> {
        Ok(match &self.resume {
            Some(resume) => {
                drop(source);
                load_pretrained::<B>(&resume.dir, &compute.load_options(true), device)
                    .with_context(|| format!("loading checkpoint {}", resume.dir.display()))?
                    .model
            }
            None => source,
        })
    }
}

/// A row that `train dpo` / `train grpo` cannot use, by the data options: fatal with the
/// strict error policy, unless it is only too long and `--truncation drop` says to drop such
/// rows; otherwise reported, and the caller skips the row.
pub(crate) fn skip_row(config: &DatasetConfig, problem: train_data::Problem) -> Result<()> {
    let drop_long = problem.kind == train_data::ProblemKind::TooLong
        && config.truncation == train_data::Truncation::Drop;
    if config.load.policy == train_data::ErrorPolicy::Strict && !drop_long {
        return Err(train_data::DataError::Row(Box::new(problem)).into());
    }
    errln!("{problem}");
    Ok(())
}

/// A row's location, or the data file's when the loader recorded none.
pub(crate) fn row_location(
    location: Option<&train_data::RowLocation>,
    config: &DatasetConfig,
) -> train_data::RowLocation {
    location.cloned().unwrap_or(train_data::RowLocation {
        path: config.dataset_path.clone(),
        line: None,
        row: 0,
    })
}

/// The checkpoint `--resume` names (a bare `--resume`: the newest intact one in `output`),
/// verified, with a line saying what is resumed.
pub(crate) fn resolve_resume(flag: Option<&str>, output: &Path) -> Result<Option<Resume>> {
    // Every checkpoint is verified against the checksums recorded when it was saved before it is
    // used; a bare --resume falls back to the newest intact one, saying so.
    let resume = match flag {
        None => None,
        Some("") => {
            let (dir, damaged) = latest_intact_checkpoint(output);
            for (path, why) in &damaged {
                errln!(
                    "warning: skipping {}: {why}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                );
            }
            let dir = dir.with_context(|| {
                format!("--resume: no intact checkpoint in {}", output.display())
            })?;
            if !damaged.is_empty() {
                errln!(
                    "resuming from {}, the newest intact checkpoint",
                    dir.display()
                );
            }
            Some(Resume::from_checkpoint(&dir)?)
        }
        Some(dir) => Some(
            Resume::from_checkpoint(Path::new(dir)).with_context(|| format!("--resume {dir}"))?,
        ),
    };
    if let Some(r) = &resume {
        let run = if r.state.run_id.is_empty() {
            "a run that recorded no id".to_string()
        } else {
            format!("run {}", r.state.run_id)
        };
        errln!(
            "resuming {run} from {} (step {} of {})",
            r.dir.display(),
            r.state.global_step,
            r.state.total_steps
        );
    }
    Ok(resume)
}

/// SIGINT / SIGTERM: finish the step, save a checkpoint, exit 130. A second signal while that
/// happens exits at once.
pub(crate) fn stop_on_signals() -> Result<RunControl> {
    let control = RunControl::new();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, control.flag())
            .and_then(|_| signal_hook::flag::register(signal, control.flag()))
            .context("installing the signal handlers")?;
    }
    Ok(control)
}

/// The `--alerts` thresholds (the defaults without the flag).
pub(crate) fn read_alerts(path: Option<&Path>) -> Result<train_monitor::AlertConfig> {
    Ok(match path {
        Some(p) => {
            let text = crate::read_settings(p, "--alerts")?;
            toml::from_str::<train_monitor::AlertConfig>(&text)
                .with_context(|| format!("--alerts {}", p.display()))?
        }
        None => train_monitor::AlertConfig::default(),
    })
}

/// Refuses an `--output` that is one of the run's inputs (the model, an adapter's base model,
/// the checkpoint resumed) before anything is written into it.
pub(crate) fn check_output(output: &Path, model_dir: &Path, resume: Option<&Resume>) -> Result<()> {
    let base = crate::adapter_base(model_dir);
    let mut inputs = vec![model_dir];
    inputs.extend(base.as_deref());
    if let Some(r) = resume {
        inputs.push(&r.dir);
    }
    train_model::check_output_dir(output, &inputs, true, "--output")?;
    Ok(())
}

/// Runs `work` on the backend and workers the flags choose, the control-file `watcher`
/// running meanwhile; the `--json` line and the exit code.
pub(crate) fn execute<W: WithBackend<Output = RunSummary>>(
    args: &RunArgs,
    watcher: ControlWatcher,
    work: W,
) -> Result<ExitCode> {
    let summary = dispatch(
        args.compute.backend,
        args.compute.device.as_deref(),
        args.devices,
        work,
    );
    drop(watcher);
    Ok(finish(&summary?, args.json))
}

/// The `--json` line and the exit code of a run that ended.
fn finish(summary: &RunSummary, json: bool) -> ExitCode {
    if json {
        outln!(
            "{}",
            json!({"status": summary.status, "global_step": summary.global_step, "train_loss": summary.train_loss,
                   "eval_loss": summary.eval_loss, "tokens_per_sec": summary.tokens_per_sec, "output": summary.output})
        );
    }
    match summary.status {
        RunStatus::Completed => ExitCode::SUCCESS,
        RunStatus::Stopped => ExitCode::from(130),
        RunStatus::Crashed => ExitCode::from(3),
        RunStatus::Failed => ExitCode::from(1),
    }
}

/// `train` / `train run`.
pub fn train(args: &RunArgs) -> Result<ExitCode> {
    let config = args.data.config()?;
    // The data cache goes into the output directory: nothing may be written there before it is
    // known not to be an input (`Launch::new` checks it; the run checks the rest).
    let launch = Launch::new(args)?;
    let cache = args
        .data
        .cache_dir
        .clone()
        .unwrap_or_else(|| launch.trainer.output_dir.join(".cache").join("data"));
    let prepared = prepare_data(&config, &launch.tok, &cache)?;
    if prepared.train.is_empty() {
        bail!(
            "{}: no training examples left after preparation",
            config.dataset_path.display()
        );
    }
    let (control, alerts, watcher) = launch.arm(args)?;
    let work = Training {
        args,
        launch,
        prepared,
        control,
        alerts,
    };
    execute(args, watcher, work)
}

/// `train eval`.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 16, value_parser = count::<{ limits::MAX_BATCH_SIZE }>)]
    pub batch_size: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

struct Evaluation<'a> {
    args: &'a EvalArgs,
    model_dir: PathBuf,
    prepared: Prepared,
    pad_id: u32,
    tok: ChatTokenizer,
}

impl WithBackend for Evaluation<'_> {
    type Output = (f64, u64);

    fn run<B: FusedAutodiffBackend>(self, placement: Placement<B>) -> Result<(f64, u64)> {
        let device = placement.main;
        let model = load_pretrained::<B::InnerBackend>(
            &self.model_dir,
            &self.args.compute.load_options(false),
            &device,
        )
        .with_context(|| format!("loading {}", self.model_dir.display()))?;
        let examples: Vec<_> = self
            .prepared
            .train
            .into_iter()
            .chain(self.prepared.validation)
            .collect();
        crate::check_tokenizer_fits(&self.tok, &self.model_dir, model.config.vocab_size)?;
        train_runner::check_token_ids(&examples, model.config.vocab_size)?;
        Ok(evaluate(
            &model.model,
            &examples,
            self.args.batch_size,
            self.pad_id,
        ))
    }
}

/// `train eval`: mean cross-entropy over every label token of the whole dataset.
pub fn eval(args: &EvalArgs) -> Result<ExitCode> {
    let mut config = args.data.config()?;
    config.validation_split = 0.0;
    let (model_dir, tok) = crate::tokenizer_for(&args.data.model)?;
    let prepared = train_data::prepare(&config, &tok, None)?;
    for p in &prepared.problems {
        errln!("{p}");
    }
    let examples = prepared.train.len() + prepared.validation.len();
    if examples == 0 {
        bail!(
            "{}: no examples to evaluate ({} rows read, {} invalid)",
            config.dataset_path.display(),
            prepared.stats.rows_read,
            prepared.stats.invalid_rows
        );
    }
    let work = Evaluation {
        args,
        model_dir,
        prepared,
        pad_id: tok.pad_id(),
        tok,
    };
    let (sum, tokens) = dispatch(
        args.compute.backend,
        args.compute.device.as_deref(),
        1,
        work,
    )?;
    if tokens == 0 {
        bail!(
            "{}: no label tokens to evaluate in {examples} examples (every example's trained \
             part was cut by --max-length or masked by --label-mode)",
            config.dataset_path.display()
        );
    }
    let loss = sum / tokens as f64;
    if !loss.is_finite() {
        errln!(
            "error: the evaluation loss of {} on {} is {loss} (not finite): the model's weights \
             overflow",
            args.data.model,
            config.dataset_path.display()
        );
        return Ok(ExitCode::from(3));
    }
    if args.json {
        outln!(
            "{}",
            json!({"loss": loss, "tokens": tokens, "examples": examples})
        );
    } else {
        outln!("loss {loss:.6} over {tokens} label tokens of {examples} examples");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_file::RunConfig;
    use clap::{CommandFactory, FromArgMatches};

    /// `train run` with `args`, bound to `file` as `real_main` does.
    fn parsed(args: &[&str], file: &RunConfig) -> RunArgs {
        let mut argv = vec!["train", "run", "--model", "m"];
        argv.extend_from_slice(args);
        let matches = crate::Cli::command().try_get_matches_from(argv).unwrap();
        let (_, sub) = matches.subcommand().unwrap();
        let mut args = RunArgs::from_arg_matches(sub).unwrap();
        args.bind(file, sub);
        args
    }

    /// Every flag reaches the setting it names: each one given with a value other than the
    /// default changes exactly its field (a misspelt id would leave the default).
    #[test]
    fn every_flag_fills_its_setting_over_the_sections() {
        let file = RunConfig {
            data: Some(DatasetConfig {
                dataset_path: "from-section.jsonl".into(),
                max_length: 99,
                ..DatasetConfig::default()
            }),
            trainer: Some(TrainerConfig {
                learning_rate: 0.5,
                batch_size: 3,
                ..TrainerConfig::default()
            }),
        };
        let none = parsed(&[], &file);
        let (d, t) = (none.data.config().unwrap(), none.trainer_config());
        assert_eq!(d.dataset_path, Path::new("from-section.jsonl"));
        assert_eq!((d.max_length, t.learning_rate, t.batch_size), (99, 0.5, 3));
        assert_eq!(t.num_epochs, TrainerConfig::default().num_epochs);

        let all = parsed(
            &[
                "--dataset",
                "d.jsonl",
                "--max-length",
                "64",
                "--packing",
                "--validation-split",
                "0.2",
                "--seed",
                "7",
                "--data-seed",
                "8",
                "--system-prompt",
                "S",
                "--thinking-emoji",
                "🤔",
                "--stop-pattern",
                "--label-mode",
                "everything",
                "--truncation",
                "drop",
                "--format",
                "json",
                "--schema",
                "alpaca",
                "--on-error",
                "skip",
                "--output",
                "o",
                "--epochs",
                "9",
                "--max-steps",
                "11",
                "--batch-size",
                "5",
                "--gradient-accumulation",
                "6",
                "--learning-rate",
                "0.25",
                "--lr-scheduler",
                "cosine",
                "--warmup-steps",
                "2",
                "--warmup-ratio",
                "0.3",
                "--logging-steps",
                "7",
                "--eval-strategy",
                "epoch",
                "--save-strategy",
                "no",
                "--eval-dataset",
                "e.jsonl",
                "--weight-decay",
                "0.1",
                "--adam-beta1",
                "0.8",
                "--adam-beta2",
                "0.99",
                "--adam-epsilon",
                "1e-6",
                "--max-grad-norm",
                "0.5",
                "--eval-steps",
                "4",
                "--eval-batch-size",
                "2",
                "--save-steps",
                "3",
                "--save-total-limit",
                "2",
                "--save-dtype",
                "bf16",
                "--no-shuffle",
                "--skip-validation",
                "--lora-r",
                "4",
                "--lora-alpha",
                "16",
                "--lora-dropout",
                "0.1",
                "--lora-target",
                "all-linear",
                "--lora-rslora",
                "--router-aux-loss-coef",
                "0.02",
                "--gradient-checkpointing",
                "--devices",
                "2",
                "--nodes",
                "3",
            ],
            &file,
        );
        let d = all.data.config().unwrap();
        let expected = DatasetConfig {
            dataset_path: "d.jsonl".into(),
            eval_dataset_path: Some("e.jsonl".into()),
            max_length: 64,
            packing: Some(true),
            validation_split: 0.2,
            apply_thinking_pattern: true,
            thinking_emoji: "🤔".into(),
            apply_stop_pattern: true,
            system_prompt: Some("S".into()),
            transforms: Vec::new(),
            label_mode: train_data::LabelMode::Everything,
            truncation: train_data::Truncation::Drop,
            seed: 8,
            load: train_data::LoadOptions {
                format: train_data::DataFormat::Json,
                schema: train_data::RowSchema::Alpaca,
                policy: train_data::ErrorPolicy::Skip,
            },
        };
        assert_eq!(d, expected);
        let t = all.trainer_config();
        let expected = TrainerConfig {
            output_dir: "o".into(),
            batch_size: 5,
            learning_rate: 0.25,
            num_epochs: 9,
            max_steps: Some(11),
            eval_steps: 4,
            save_steps: 3,
            gradient_accumulation_steps: 6,
            warmup_steps: 2,
            warmup_ratio: 0.3,
            logging_steps: 7,
            eval_strategy: IntervalStrategy::Epoch,
            save_strategy: IntervalStrategy::No,
            lr_scheduler: LrSchedule::Cosine,
            weight_decay: 0.1,
            adam_beta1: 0.8,
            adam_beta2: 0.99,
            adam_epsilon: 1e-6,
            max_grad_norm: 0.5,
            seed: 7,
            shuffle: false,
            save_total_limit: Some(2),
            skip_validation: true,
            eval_batch_size: Some(2),
            save_dtype: Some(StorageDtype::Bf16),
            lora: Some(LoraConfig {
                r: 4,
                alpha: 16.0,
                dropout: 0.1,
                target_modules: vec!["all-linear".into()],
                use_rslora: true,
            }),
            router_aux_loss_coef: Some(0.02),
            gradient_checkpointing: true,
        };
        assert_eq!(t, expected);
    }
}
