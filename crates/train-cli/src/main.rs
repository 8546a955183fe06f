//! `train`: the command line of train-rs. Only argument parsing, composition of the library
//! crates, and printing live here (contract: `../shared/docs/cli-contract.md`).

// Printing never panics: a closed pipe (`train data check bad.jsonl | head -2`) or a full disk
// behind a redirect must not turn into a panic, nor stop a training run that is still saving its
// work. Output that cannot be written is dropped and the command finishes with its own exit code.
// (`println!` and friends panic when the write fails.)
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        crate::progress::clear_bar();
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
macro_rules! errp {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}

mod allocator;
mod backend;
mod config_file;
mod control;
mod dpo_cmd;
mod export_cmd;
mod generate_cmd;
mod grpo_cmd;
mod hints;
mod inspect;
mod merge_cmd;
mod monitor;
mod progress;
mod registry;
mod run_cmd;
mod status_cmd;
#[cfg(all(feature = "tch", target_os = "linux"))]
mod torch_cuda;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use registry::{ModelRegistry, REGISTRY_ENV};
use serde_json::json;
use train_data::{
    ChatTokenizer, DataFormat, DatasetConfig, ErrorPolicy, LabelMode, LoadOptions, RowSchema,
    TransformPipeline, Truncation,
};

#[derive(Parser, Debug)]
#[command(
    name = "train",
    version,
    about = "Fine-tune open LLMs (Qwen3, Qwen2, Llama / SmolLM2, Mistral, OLMo 2, SmolLM3, Gemma 3) in Rust"
)]
struct Cli {
    /// Read flags from a TOML file (keys are flag names in snake_case); command-line flags win.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Revision of a Hugging Face Hub model id given as a model (`--model org/name`): a branch,
    /// a tag or a commit (default `main`).
    #[arg(long, global = true, value_name = "REV")]
    revision: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// `train --dataset … --model …` (flags first, no subcommand) is `train run …`.
fn default_to_run(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if argv.get(1).is_some_and(|a| {
        let a = a.to_string_lossy();
        a.starts_with("--") && !matches!(a.as_ref(), "--help" | "--version")
    }) {
        argv.insert(1, "run".into());
    }
    argv
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune a model (the default command).
    Run(Box<run_cmd::RunArgs>),
    /// Preference training (DPO, as TRL's DPOTrainer) on pairs of chosen and rejected
    /// completions, with every training flag of `train run`.
    Dpo(Box<dpo_cmd::DpoArgs>),
    /// Preference training without a reference model (ORPO, as TRL's ORPOTrainer): the chosen
    /// conversation's NLL plus an odds-ratio term, with every training flag of `train run`.
    Orpo(Box<dpo_cmd::OrpoArgs>),
    /// Online reinforcement learning (GRPO, as TRL's GRPOTrainer): sample completions of each
    /// prompt, score them with reward functions, train on their advantages.
    Grpo(Box<grpo_cmd::GrpoArgs>),
    /// Mean loss of a model over every label token of a dataset.
    Eval(run_cmd::EvalArgs),
    /// Answer a prompt with a model (chat template, KV cache, logits processors).
    Generate(generate_cmd::GenerateArgs),
    /// Fold a LoRA adapter into its base model and save a plain model directory.
    Merge(merge_cmd::MergeArgs),
    /// Write a model as a llama.cpp GGUF file (llama, mistral, qwen2, qwen3, olmo2, smollm3,
    /// gemma3; f16 or q8_0).
    Export(export_cmd::ExportArgs),
    /// A compact summary of a running or finished run (from its status file).
    Status {
        /// The run's output directory.
        output: PathBuf,
        /// Where its status file is, when not `OUTPUT/status`.
        #[arg(long, value_name = "DIR")]
        status_dir: Option<PathBuf>,
        /// Refresh every 2 s until the run ends.
        #[arg(long)]
        watch: bool,
        /// Print the status file's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Pause, resume or stop a running `train` (it checks between steps).
    Control {
        /// What to ask.
        #[arg(value_enum)]
        command: control::ControlCommand,
        /// The run's output directory.
        output: PathBuf,
    },
    /// Validate, inspect and prepare datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// The model registry (names for model directories).
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Coordinate a data-parallel run over several machines (burn's global collective): start it
    /// on one machine, then `train run --nodes N --node-rank R --orchestrator HOST:PORT
    /// --node-address THIS_HOST:PORT …` on each. Runs until Ctrl-C or SIGTERM.
    Orchestrator {
        /// Port to listen on (every interface).
        #[arg(long, default_value_t = 3000)]
        port: u16,
    },
    /// The names accepted for others, as JSON (for the generated configuration reference):
    /// every flag's visible aliases and the config file's own key aliases.
    #[command(hide = true)]
    ReferenceAliases,
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Validate a data file without a model: every problem with its line and field.
    Check {
        /// The data file (JSONL, JSON array or Parquet).
        dataset: PathBuf,
        /// Also count rows over --max-length with this model's tokenizer and template.
        #[arg(long)]
        model: Option<String>,
        /// Maximum length for the too-long check (with --model).
        #[arg(long, default_value_t = train_data::DEFAULT_MAX_LENGTH, value_parser = run_cmd::max_length)]
        max_length: usize,
        #[command(flatten)]
        load: LoadArgs,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Token counts, label counts, truncation and packing efficiency.
    Stats {
        #[command(flatten)]
        data: DataArgs,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write the tokenized, split dataset (Parquet) and its statistics to a directory.
    Prepare {
        #[command(flatten)]
        data: DataArgs,
        /// Output directory.
        #[arg(long)]
        output: PathBuf,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone)]
struct LoadArgs {
    /// Container format.
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
    /// Row shape.
    #[arg(long, value_enum, default_value_t = SchemaArg::Auto)]
    schema: SchemaArg,
    /// Invalid rows: stop at the first (strict) or drop and report each (skip).
    #[arg(long, value_enum, default_value_t = PolicyArg::Strict)]
    on_error: PolicyArg,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct DataArgs {
    /// Model directory or registry name (its tokenizer and chat template are used).
    #[arg(long, visible_alias = "model-name-or-path")]
    model: String,
    /// The data file (required here or as `dataset_path` in the --config file's `[data]`).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Evaluate on this data file (every row) instead of a split of --dataset.
    #[arg(long, value_name = "FILE")]
    eval_dataset: Option<PathBuf>,
    /// Longest example in tokens.
    #[arg(long, visible_alias = "max-seq-length", default_value_t = data_defaults().max_length, value_parser = run_cmd::max_length)]
    max_length: usize,
    /// Validation rows: a fraction below 1, or a count.
    #[arg(long, default_value_t = data_defaults().validation_split)]
    validation_split: f64,
    /// Seed of the run: shuffling, new weights (LoRA) and, unless --data-seed, the data's
    /// transforms and split.
    #[arg(long, default_value_t = data_defaults().seed)]
    seed: u64,
    /// Seed of the data's transforms and split (default: --seed).
    #[arg(long)]
    data_seed: Option<u64>,
    /// Pack the training examples into rows of --max-length tokens (no attention across
    /// examples). The default for a data file of `text` rows.
    #[arg(long, visible_alias = "sample-packing")]
    packing: bool,
    /// Do not pack a data file of `text` rows.
    #[arg(long, conflicts_with = "packing")]
    no_packing: bool,
    /// Insert this system prompt in rows without one.
    #[arg(long)]
    system_prompt: Option<String>,
    /// Add the thinking emoji pattern.
    #[arg(long)]
    thinking_pattern: bool,
    /// Fixed emoji of the thinking pattern (default: random per turn).
    #[arg(long)]
    thinking_emoji: Option<String>,
    /// Add the stop emoji pattern.
    #[arg(long)]
    stop_pattern: bool,
    /// A TOML file of `[[transform]]` tables, applied first.
    #[arg(long, value_name = "FILE")]
    transforms: Option<PathBuf>,
    /// Which tokens are trained.
    #[arg(long, value_enum, default_value_t = LabelModeArg::AllAssistant)]
    label_mode: LabelModeArg,
    /// Examples over --max-length: truncate or drop.
    #[arg(long, value_enum, default_value_t = TruncationArg::Truncate)]
    truncation: TruncationArg,
    /// Keep tokenized datasets here, keyed by a hash of data, tokenizer, template and flags,
    /// so that a second run skips tokenization.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    load: LoadArgs,
    /// The `[data]` section of the --config file.
    #[arg(skip)]
    section: Option<DatasetConfig>,
    /// The flags given (the others keep the section's value or the default).
    #[arg(skip)]
    given: config_file::Given,
}

/// The data side's defaults (the flags show them; the one place they are written is
/// `DatasetConfig::default`).
fn data_defaults() -> DatasetConfig {
    DatasetConfig::default()
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// List registered models and adapters.
    List {
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Register every model (config.json) and adapter (adapter_config.json) directory under DIR.
    Scan {
        /// Directory to search.
        dir: PathBuf,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Register DIR under NAME.
    Add {
        /// The name.
        name: String,
        /// The model or adapter directory.
        dir: PathBuf,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show one registered model.
    Show {
        /// The name.
        name: String,
        /// Print one JSON object on the last line of stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum FormatArg {
    Auto,
    Jsonl,
    Json,
    Parquet,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum SchemaArg {
    Auto,
    Messages,
    Alpaca,
    Sharegpt,
    PromptCompletion,
    Text,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PolicyArg {
    Strict,
    Skip,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LabelModeArg {
    AllAssistant,
    LastAssistant,
    Everything,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum TruncationArg {
    Truncate,
    Drop,
}

impl LoadArgs {
    fn options(&self) -> LoadOptions {
        let mut o = LoadOptions::default();
        self.apply_all(&mut o, |_| true);
        o
    }

    /// The flags given, over `o`.
    fn apply(&self, given: &config_file::Given, o: &mut LoadOptions) {
        self.apply_all(o, |id| given.has(id));
    }

    fn apply_all(&self, o: &mut LoadOptions, given: impl Fn(&str) -> bool) {
        if given("format") {
            o.format = match self.format {
                FormatArg::Auto => DataFormat::Auto,
                FormatArg::Jsonl => DataFormat::Jsonl,
                FormatArg::Json => DataFormat::Json,
                FormatArg::Parquet => DataFormat::Parquet,
            };
        }
        if given("schema") {
            o.schema = match self.schema {
                SchemaArg::Auto => RowSchema::Auto,
                SchemaArg::Messages => RowSchema::Messages,
                SchemaArg::Alpaca => RowSchema::Alpaca,
                SchemaArg::Sharegpt => RowSchema::ShareGpt,
                SchemaArg::PromptCompletion => RowSchema::PromptCompletion,
                SchemaArg::Text => RowSchema::Text,
            };
        }
        if given("on_error") {
            o.policy = match self.on_error {
                PolicyArg::Strict => ErrorPolicy::Strict,
                PolicyArg::Skip => ErrorPolicy::Skip,
            };
        }
    }
}

impl DataArgs {
    /// The model as given (`--model`).
    pub(crate) fn model_name(&self) -> &str {
        &self.model
    }

    /// Binds the `[data]` section of the --config file and the flags given in `matches`.
    pub(crate) fn bind(&mut self, section: Option<&DatasetConfig>, matches: &clap::ArgMatches) {
        self.section = section.cloned();
        self.given = config_file::Given::new(matches);
    }

    /// The data configuration, built once: the `[data]` section (or the defaults), then every
    /// flag given.
    pub(crate) fn config(&self) -> Result<DatasetConfig> {
        let g = &self.given;
        let mut c = self.section.clone().unwrap_or_default();
        if let Some(d) = self.dataset.as_ref().filter(|_| g.has("dataset")) {
            c.dataset_path = d.clone();
        }
        if let Some(d) = self.eval_dataset.as_ref().filter(|_| g.has("eval_dataset")) {
            c.eval_dataset_path = Some(d.clone());
        }
        if c.dataset_path.as_os_str().is_empty() {
            anyhow::bail!(
                "no dataset: give --dataset FILE (or `dataset_path` in the --config file's [data])"
            );
        }
        if g.has("max_length") {
            c.max_length = self.max_length;
        }
        if g.has("packing") {
            c.packing = Some(true);
        }
        if g.has("no_packing") {
            c.packing = Some(false);
        }
        if g.has("validation_split") {
            c.validation_split = self.validation_split;
        }
        if g.has("thinking_pattern") || g.has("thinking_emoji") {
            c.apply_thinking_pattern = true;
        }
        if let Some(emoji) = self
            .thinking_emoji
            .as_ref()
            .filter(|_| g.has("thinking_emoji"))
        {
            c.thinking_emoji = emoji.clone();
        }
        if g.has("stop_pattern") {
            c.apply_stop_pattern = true;
        }
        if g.has("system_prompt") {
            c.system_prompt = self.system_prompt.clone();
        }
        if let Some(path) = self.transforms.as_ref().filter(|_| g.has("transforms")) {
            let text = read_settings(path, "--transforms")?;
            c.transforms = TransformPipeline::configs_from_toml(&text)
                .with_context(|| format!("in {}", path.display()))?;
        }
        if g.has("label_mode") {
            c.label_mode = match self.label_mode {
                LabelModeArg::AllAssistant => LabelMode::AllAssistant,
                LabelModeArg::LastAssistant => LabelMode::LastAssistant,
                LabelModeArg::Everything => LabelMode::Everything,
            };
        }
        if g.has("truncation") {
            c.truncation = match self.truncation {
                TruncationArg::Truncate => Truncation::Truncate,
                TruncationArg::Drop => Truncation::Drop,
            };
        }
        if g.has("data_seed") || g.has("seed") {
            c.seed = self.data_seed.unwrap_or(self.seed);
        }
        self.load.apply(g, &mut c.load);
        Ok(c)
    }
}

/// Largest settings file (TOML) read: far above any real one.
const MAX_SETTINGS_BYTES: u64 = 16 << 20;

/// Reads a settings file named by `flag`: a regular file (a FIFO or a device would block or
/// never end) of at most [`MAX_SETTINGS_BYTES`].
pub(crate) fn read_settings(path: &std::path::Path, flag: &str) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{flag} {}: not a regular file", path.display());
    }
    if meta.len() > MAX_SETTINGS_BYTES {
        anyhow::bail!(
            "{flag} {}: {} bytes, above the limit of {MAX_SETTINGS_BYTES} for a settings file",
            path.display(),
            meta.len()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))
}

pub(crate) fn registry() -> Result<ModelRegistry> {
    if let Some(path) = std::env::var_os(REGISTRY_ENV) {
        return Ok(ModelRegistry::at(PathBuf::from(path)));
    }
    let path = ModelRegistry::default_path().with_context(|| {
        format!("no user configuration directory; set {REGISTRY_ENV} to a file path")
    })?;
    Ok(ModelRegistry::at(path))
}

/// The base model directory of an adapter directory (`None` for a model, or an adapter whose
/// base cannot be found: loading it says why).
pub(crate) fn adapter_base(dir: &std::path::Path) -> Option<PathBuf> {
    if !train_model::is_adapter_dir(dir) {
        return None;
    }
    let adapter = train_model::read_adapter_config(dir).ok()?;
    train_model::resolve_base_model(dir, adapter.base_model.as_deref()).ok()
}

/// The model directory `model` names and its tokenizer. An adapter directory without tokenizer
/// files uses its base model's.
pub(crate) fn tokenizer_for(model: &str) -> Result<(PathBuf, ChatTokenizer)> {
    let dir = registry()?.resolve(model)?;
    let tok_dir = if train_model::is_adapter_dir(&dir) && !dir.join("tokenizer.json").is_file() {
        let adapter = train_model::read_adapter_config(&dir)?;
        train_model::resolve_base_model(&dir, adapter.base_model.as_deref())?
    } else {
        dir.clone()
    };
    let tok = ChatTokenizer::from_model_dir(&tok_dir)
        .with_context(|| format!("loading the tokenizer of {}", tok_dir.display()))?;
    Ok((dir, tok))
}

/// Checked once, where a model and a tokenizer meet: every id the tokenizer can produce (and
/// its padding id) must be a row of the model's embedding, or the first batch would index past
/// it. `model_dir` names the model in the message.
pub(crate) fn check_tokenizer_fits(
    tok: &ChatTokenizer,
    model_dir: &std::path::Path,
    vocab_size: usize,
) -> Result<()> {
    let highest = tok
        .tokenizer()
        .get_vocab(true)
        .into_values()
        .max()
        .unwrap_or(0)
        .max(tok.pad_id());
    if highest as usize >= vocab_size {
        anyhow::bail!(
            "{}: the tokenizer produces token id {highest}, but the model's vocab_size is \
             {vocab_size} (config.json); the tokenizer does not belong to this model",
            model_dir.display()
        );
    }
    Ok(())
}

/// Prepares the dataset, through the cache when `--cache-dir` is given.
fn prepare(data: &DataArgs, tok: &ChatTokenizer) -> Result<(DatasetConfig, train_data::Prepared)> {
    let config = data.config()?;
    let prepared = match &data.cache_dir {
        Some(dir) => {
            let (p, hit) = train_data::prepare_cached(&config, tok, dir)?;
            if hit {
                errln!("tokenized dataset read from the cache in {}", dir.display());
            }
            p
        }
        None => train_data::prepare(&config, tok, None)?,
    };
    for p in &prepared.problems {
        errln!("{p}");
    }
    Ok((config, prepared))
}

pub(crate) fn print_json(value: &serde_json::Value) {
    outln!("{value}");
}

/// An error and its causes on one line, each reason once: a cause whose text the line already
/// holds (an I/O error that the outer message quotes) is not repeated.
/// The line a failed command prints: `error: …`, unless the message is already a located
/// `FILE:LINE: error: …` (a data row's problem, as `train data check` prints it), which is not
/// prefixed a second time.
fn error_line(e: &anyhow::Error) -> String {
    let line = one_line(e);
    if line.contains(": error: ") {
        line
    } else {
        format!("error: {line}")
    }
}

fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    if let Some(hint) = hints::hint(e) {
        line.push_str("; ");
        line.push_str(&hint);
    }
    line
}

/// Exit status of a bug (a panic that no code path turned into an error): BSD's EX_SOFTWARE.
const EXIT_INTERNAL: u8 = 70;

/// Where the last panic happened, recorded by the hook for the one-line report.
static PANIC_AT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The panic hook records where a panic happened and prints nothing: panics that library code
/// catches on purpose (polars' Parquet decoder) stay silent, and one that reaches `main` is
/// reported there in one line, without a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        if let Ok(mut slot) = PANIC_AT.lock() {
            *slot = Some(at);
        }
    }));
}

fn panic_report(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    let at = PANIC_AT
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .unwrap_or_default();
    format!(
        "error: internal error: {what} (at {at}). This is a bug in train-rs, not in your input: \
         please report it with the command you ran. Nothing saved before this point was changed."
    )
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    install_panic_hook();
    match std::panic::catch_unwind(real_main) {
        Ok(code) => code,
        Err(payload) => {
            errln!("{}", panic_report(payload.as_ref()));
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

fn real_main() -> ExitCode {
    let argv = default_to_run(std::env::args_os().collect());
    let (argv, file) = match config_file::merge(argv, &cli_command()) {
        Ok(a) => a,
        Err(e) => {
            errln!("{}", error_line(&e));
            return ExitCode::from(2);
        }
    };
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .unwrap_or_else(|e| e.exit());
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(r) = cli.revision.clone() {
        let _ = registry::HUB_REVISION.set(r);
    }
    bind(&mut cli, &file, &matches);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            errln!("{}", error_line(&e));
            ExitCode::from(1)
        }
    }
}

/// Every visible alias of a training flag (`train run`'s, which `dpo`, `orpo` and `grpo`
/// share) and the config file's key aliases, as JSON: `docs/reference/configuration.md`'s alias
/// table is generated from it, so it cannot drift from the code.
fn reference_aliases() -> serde_json::Value {
    let cli = cli_command();
    let flags: Vec<serde_json::Value> = cli
        .find_subcommand("run")
        .into_iter()
        .flat_map(clap::Command::get_arguments)
        .filter_map(|a| {
            let aliases: Vec<String> = a
                .get_visible_aliases()?
                .into_iter()
                .map(|x| format!("--{x}"))
                .collect();
            Some(serde_json::json!({"flag": format!("--{}", a.get_long()?), "aliases": aliases}))
        })
        .collect();
    serde_json::json!({"flags": flags, "file_keys": config_file::key_aliases()})
}

/// The whole command line interface.
pub(crate) fn cli_command() -> clap::Command {
    Cli::command()
}

/// Hands each command the --config file's sections and which of its flags were given.
fn bind(cli: &mut Cli, file: &config_file::RunConfig, matches: &clap::ArgMatches) {
    let Some((name, sub)) = matches.subcommand() else {
        return;
    };
    match (&mut cli.command, name) {
        (Command::Run(args), "run") => args.bind(file, sub),
        (Command::Dpo(args), "dpo") => args.run.bind(file, sub),
        (Command::Orpo(args), "orpo") => args.run.bind(file, sub),
        (Command::Grpo(args), "grpo") => args.run.bind(file, sub),
        (Command::Eval(args), "eval") => args.data.bind(file.data.as_ref(), sub),
        (
            Command::Data(DataCommand::Stats { data, .. } | DataCommand::Prepare { data, .. }),
            "data",
        ) => {
            if let Some((_, m)) = sub.subcommand() {
                data.bind(file.data.as_ref(), m);
            }
        }
        _ => {}
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run_cmd::train(&args),
        Command::Dpo(args) => dpo_cmd::dpo(&args),
        Command::Orpo(args) => dpo_cmd::orpo(&args),
        Command::Grpo(args) => grpo_cmd::grpo(&args),
        Command::Eval(args) => run_cmd::eval(&args),
        Command::Generate(args) => generate_cmd::run(&args),
        Command::Merge(args) => merge_cmd::run(&args),
        Command::Export(args) => export_cmd::run(&args),
        Command::Orchestrator { port } => orchestrator(port),
        Command::ReferenceAliases => {
            outln!("{}", reference_aliases());
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            output,
            status_dir,
            watch,
            json,
        } => status_cmd::run(&output, status_dir.as_ref(), watch, json),
        Command::Control { command, output } => {
            control::send(command, &output)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Data(cmd) => data(cmd),
        Command::Models(cmd) => models(cmd),
    }
}

/// How many rows with one and the same problem `train data check` lists before it summarises
/// the rest in one line.
const SAME_PROBLEM_SHOWN: usize = 3;

/// Each problem on its line, except that a problem repeated row after row (a file of another
/// shape, one field misnamed throughout) is listed [`SAME_PROBLEM_SHOWN`] times and then counted
/// in one closing line. `--json` keeps every problem.
fn print_problems(path: &str, problems: &[train_data::Problem]) {
    use std::collections::HashMap;
    type Key<'a> = (train_data::Severity, &'a str, &'a str);
    // Rows of no supported shape (a file of another format): one summary with the keys found.
    let (shapeless, problems): (Vec<&train_data::Problem>, Vec<&train_data::Problem>) = problems
        .iter()
        .partition(|p| p.message.starts_with(train_data::NO_SHAPE));
    if !shapeless.is_empty() {
        let mut keys: Vec<&str> = Vec::new();
        for p in shapeless.iter().take(SAME_PROBLEM_SHOWN) {
            if let Some((_, found)) = p.message.split_once("the row's keys: ") {
                for k in found.split(", ") {
                    if !keys.contains(&k) {
                        keys.push(k);
                    }
                }
            }
        }
        let first = shapeless[0].location.to_string();
        outln!(
            "{first}: error: {} row{} {} {}; the keys of the first: {}",
            shapeless.len(),
            if shapeless.len() == 1 { "" } else { "s" },
            if shapeless.len() == 1 { "has" } else { "have" },
            train_data::NO_SHAPE,
            keys.join(", ")
        );
    }
    let mut seen: HashMap<Key<'_>, usize> = HashMap::new();
    let mut order: Vec<Key<'_>> = Vec::new();
    for p in problems {
        let k = (p.severity, p.field.as_str(), p.message.as_str());
        let n = seen.entry(k).or_insert_with(|| {
            order.push(k);
            0
        });
        *n += 1;
        if *n <= SAME_PROBLEM_SHOWN {
            outln!("{p}");
        }
    }
    for k in order {
        let more = seen[&k].saturating_sub(SAME_PROBLEM_SHOWN);
        if more > 0 {
            let (sev, field, message) = k;
            let field = if field.is_empty() {
                String::new()
            } else {
                format!("field `{field}`: ")
            };
            outln!("{path}: … and {more} more of the same {sev}: {field}{message}");
        }
    }
}

fn data(cmd: DataCommand) -> Result<ExitCode> {
    match cmd {
        DataCommand::Check {
            dataset,
            model,
            max_length,
            load,
            json,
        } => {
            let tok = model.as_deref().map(tokenizer_for).transpose()?;
            let report = train_data::check_file(
                &dataset,
                &load.options(),
                tok.as_ref().map(|(_, t)| (t, max_length)),
            )?;
            if json {
                print_json(&serde_json::to_value(&report)?);
            } else {
                print_problems(&report.path, &report.problems);
                outln!(
                    "{}: {} rows, {} valid, {} invalid; {} errors, {} warnings ({} duplicates, {} answer leakage, {} too long, {} tokens lost)",
                    report.path,
                    report.rows,
                    report.valid_rows,
                    report.invalid_rows,
                    report.errors,
                    report.warnings,
                    report.duplicates,
                    report.leakage,
                    report.too_long,
                    report.tokens_lost
                );
            }
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        DataCommand::Stats { data, json } => {
            let (dir, tok) = tokenizer_for(&data.model)?;
            let (config, prepared) = prepare(&data, &tok)?;
            let s = &prepared.stats;
            if json {
                let mut v = serde_json::to_value(s)?;
                v["dataset"] = json!(config.dataset_path);
                v["model"] = json!(dir);
                print_json(&v);
            } else {
                outln!(
                    "dataset: {} ({} rows read, {} invalid)",
                    config.dataset_path.display(),
                    s.rows_read,
                    s.invalid_rows
                );
                outln!("model: {}", dir.display());
                outln!(
                    "examples: {} (train {}, validation {})",
                    s.examples,
                    s.train_examples,
                    s.validation_examples
                );
                outln!(
                    "tokens: {} (mean {:.1}, longest {}, max length {})",
                    s.tokens,
                    s.mean_tokens,
                    s.longest,
                    s.max_length
                );
                outln!(
                    "label tokens: {} ({} inserted by the chat template)",
                    s.label_tokens,
                    s.template_label_tokens
                );
                outln!(
                    "truncated: {}, dropped: {}, left without labels: {}, tokens lost: {}",
                    s.truncated_rows,
                    s.dropped_rows,
                    s.rows_without_labels,
                    s.tokens_lost
                );
                outln!(
                    "packing (train): {} rows of {} tokens, efficiency {:.1} %",
                    s.packed_rows,
                    s.max_length,
                    100.0 * s.packing_efficiency
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::Prepare { data, output, json } => {
            let (_, tok) = tokenizer_for(&data.model)?;
            let (_, prepared) = prepare(&data, &tok)?;
            train_data::write_prepared(&output, &prepared)?;
            let s = &prepared.stats;
            if json {
                print_json(
                    &json!({"output": output, "train_examples": s.train_examples,
                    "validation_examples": s.validation_examples, "tokens": s.tokens, "label_tokens": s.label_tokens}),
                );
            } else {
                outln!(
                    "wrote {} train and {} validation examples ({} tokens) to {}",
                    s.train_examples,
                    s.validation_examples,
                    s.tokens,
                    output.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn models(cmd: ModelsCommand) -> Result<ExitCode> {
    let registry = registry()?;
    let show = |entries: &[registry::ModelEntry]| {
        for e in entries {
            let size = e.size_bytes as f64 / 1e6;
            match e.kind {
                registry::EntryKind::Model => outln!(
                    "{:<24} {:<7} hidden {:>5}  layers {:>3}  vocab {:>7}  {:>9.1} MB  {}",
                    e.name,
                    e.model_type.as_deref().unwrap_or("?"),
                    e.hidden_size.unwrap_or(0),
                    e.num_layers.unwrap_or(0),
                    e.vocab_size.unwrap_or(0),
                    size,
                    e.path.display()
                ),
                registry::EntryKind::Adapter => outln!(
                    "{:<24} adapter of {}  {:>9.1} MB  {}",
                    e.name,
                    e.base_model.as_deref().unwrap_or("?"),
                    size,
                    e.path.display()
                ),
            }
        }
    };
    match cmd {
        ModelsCommand::List { json } => {
            let entries = registry.list()?;
            if json {
                print_json(&json!({"registry": registry.path(), "models": entries}));
            } else {
                errln!("registry: {}", registry.path().display());
                show(&entries);
            }
        }
        ModelsCommand::Scan { dir, json } => {
            let entries = registry.scan(&dir)?;
            if json {
                print_json(&json!({"registry": registry.path(), "found": entries}));
            } else {
                show(&entries);
                errln!(
                    "{} found under {}, recorded in {}",
                    entries.len(),
                    dir.display(),
                    registry.path().display()
                );
            }
        }
        ModelsCommand::Add { name, dir, json } => {
            let entry = registry.add(&name, &dir)?;
            if json {
                print_json(&serde_json::to_value(&entry)?);
            } else {
                show(std::slice::from_ref(&entry));
            }
        }
        ModelsCommand::Show { name, json } => {
            let entry = registry.get(&name)?.with_context(|| {
                format!("no model named `{name}` in {}", registry.path().display())
            })?;
            if json {
                print_json(&serde_json::to_value(&entry)?);
            } else {
                show(std::slice::from_ref(&entry));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `train orchestrator`: burn's global-collective orchestrator, until Ctrl-C or SIGTERM.
fn orchestrator(port: u16) -> Result<ExitCode> {
    // burn's server only logs a failure to listen: find it out here, with a clear message.
    drop(
        std::net::TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("--port {port}: cannot listen on it"))?,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the orchestrator's runtime")?;
    // Say where it listens before it does, so that scripts can wait for the line.
    errln!("orchestrator listening on port {port} (Ctrl-C to stop)");
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    errln!("orchestrator stopped");
    Ok(ExitCode::SUCCESS)
}
