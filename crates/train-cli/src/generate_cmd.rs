//! `train generate`: a chat answer from a model, with the standard and the origin's processors.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use train_data::{ChatTokenizer, Message, Role};
use train_logits::{
    Decoding, Generation, GenerationConfig, LogitsProcessor, ProcessorConfig, ProcessorContext,
    ProcessorsFile, build_processors, generate,
};
use train_model::FusedAutodiffBackend;
use train_model::load_pretrained;

use crate::backend::{Placement, WithBackend, dispatch};
use crate::run_cmd::ComputeArgs;

/// `train generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The model: a directory or a registry name.
    #[arg(long)]
    pub model: String,
    /// The user message (the chat template is applied, with a generation prompt).
    #[arg(long)]
    pub prompt: String,
    /// A system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, value_parser = crate::run_cmd::count::<{ 1 << 20 }>)]
    pub max_new_tokens: usize,
    /// Sample at this temperature; without it decoding is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A TOML file of `[[processors]]` (e.g. the origin's `scheduled_token_penalty` and
    /// `post_stop_penalty`), applied before temperature / top-k / top-p.
    #[arg(long, value_name = "FILE.toml")]
    pub processors: Option<PathBuf>,
    /// Stop when this text is generated (repeatable).
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Every id that ends a turn: the model's eos ids, `generation_config.json`'s, and the chat
/// template's end-of-turn tokens.
struct Generate<'a> {
    args: &'a GenerateArgs,
    dir: PathBuf,
    tok: ChatTokenizer,
    prompt: Vec<u32>,
    configs: Vec<ProcessorConfig>,
}

struct Output {
    generation: Generation,
    seconds: f64,
    stats: Vec<serde_json::Value>,
}

impl WithBackend for Generate<'_> {
    type Output = Output;

    fn run<B: FusedAutodiffBackend>(self, placement: Placement<B>) -> Result<Output> {
        let device = placement.main;
        let loaded = load_pretrained::<B::InnerBackend>(
            &self.dir,
            &self.args.compute.load_options(false),
            &device,
        )
        .with_context(|| format!("loading {}", self.dir.display()))?;
        crate::check_tokenizer_fits(&self.tok, &self.dir, loaded.config.vocab_size)?;
        let ends = train_logits::end_ids(&self.dir, &loaded.config.eos_token_ids, &self.tok);
        let ctx = ProcessorContext {
            tokenizer: Some(self.tok.tokenizer()),
            end_ids: &ends,
        };
        let mut processors: Vec<Box<dyn LogitsProcessor>> =
            build_processors(&self.configs, &ctx).with_context(|| match &self.args.processors {
                Some(p) => format!("processors of {}", p.display()),
                None => "processors".to_string(),
            })?;
        let config = GenerationConfig {
            max_new_tokens: self.args.max_new_tokens,
            decoding: if self.args.temperature.is_some() {
                Decoding::Sample {
                    seed: self.args.seed,
                }
            } else {
                Decoding::Greedy
            },
            stop_token_ids: ends.clone(),
            stop_strings: self.args.stop.clone(),
            pad_token_id: self.tok.pad_id(),
        };
        let started = Instant::now();
        let mut out = generate(
            &loaded.model,
            Some(self.tok.tokenizer()),
            std::slice::from_ref(&self.prompt),
            &mut processors,
            &config,
        )?;
        let seconds = started.elapsed().as_secs_f64();
        let stats = processors
            .iter()
            .filter_map(|p| p.stats().map(|s| json!({"processor": p.name(), "rows": s})))
            .collect();
        Ok(Output {
            generation: out.remove(0),
            seconds,
            stats,
        })
    }
}

/// Runs `train generate`.
pub fn run(args: &GenerateArgs) -> Result<ExitCode> {
    let (dir, tok) = crate::tokenizer_for(&args.model)?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message::new(Role::System, s.clone()));
    }
    messages.push(Message::new(Role::User, args.prompt.clone()));
    let prompt = tok
        .encode_prompt(&messages)
        .context("applying the chat template to the prompt")?;
    let configs = sampling_processors(
        args.processors.as_deref(),
        args.temperature,
        args.top_k,
        args.top_p,
    )?;
    let work = Generate {
        args,
        dir,
        tok,
        prompt,
        configs,
    };
    let out = dispatch(
        args.compute.backend,
        args.compute.device.as_deref(),
        1,
        work,
    )?;
    let g = &out.generation;
    let n = g.token_ids.len();
    let per_sec = n as f64 / out.seconds.max(1e-9);
    if args.json {
        outln!(
            "{}",
            json!({
                "text": g.text,
                "tokens": n,
                "token_ids": g.token_ids,
                "stop_reason": g.stop_reason.as_str(),
                "stop_string": g.stop_string,
                "tokens_per_sec": per_sec,
                "processors": out.stats,
            })
        );
    } else {
        outln!("{}", g.text);
        errln!(
            "[{} tokens in {:.2}s ({per_sec:.1} tokens/s), stopped: {}]",
            n,
            out.seconds,
            g.stop_reason.as_str()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The processors of sampling: those of a `[[processors]]` file, then temperature, top-k and
/// top-p when given (`train generate`, `train grpo`).
pub(crate) fn sampling_processors(
    file: Option<&std::path::Path>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
) -> Result<Vec<ProcessorConfig>> {
    let mut configs = match file {
        Some(p) => ProcessorsFile::read(p)?.processors,
        None => Vec::new(),
    };
    if let Some(temperature) = temperature {
        configs.push(ProcessorConfig::Temperature { temperature });
    }
    if let Some(top_k) = top_k {
        configs.push(ProcessorConfig::TopK {
            top_k,
            min_tokens_to_keep: 1,
        });
    }
    if let Some(top_p) = top_p {
        configs.push(ProcessorConfig::TopP {
            top_p,
            min_tokens_to_keep: 1,
        });
    }
    Ok(configs)
}
