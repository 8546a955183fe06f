//! `train merge ADAPTER --output DIR`: folds a LoRA adapter into its base model and saves a
//! plain model directory (PEFT's `merge_and_unload` + `save_pretrained`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use train_model::FusedAutodiffBackend;
use train_model::{
    LoadOptions, Precision, SaveOptions, StorageDtype, copy_companions, load_pretrained,
    save_pretrained,
};

use crate::backend::{Placement, WithBackend, dispatch};
use crate::run_cmd::{ComputeArgs, DtypeArg};

/// `train merge`.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The adapter: a PEFT adapter directory (or its registry name) whose
    /// `base_model_name_or_path` is a model directory here.
    pub adapter: String,
    /// Where to write the merged model.
    #[arg(long)]
    pub output: PathBuf,
    /// Dtype of the merged weights on disk (default: the base model's).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Replace a model that --output already holds (never the adapter, its base model, or a
    /// training checkpoint).
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

struct Merge<'a> {
    args: &'a MergeArgs,
    dir: PathBuf,
}

struct Merged {
    base: PathBuf,
    dtype: StorageDtype,
    bytes: u64,
    adapter_parameters: usize,
}

impl WithBackend for Merge<'_> {
    type Output = Merged;

    fn run<B: FusedAutodiffBackend>(self, placement: Placement<B>) -> Result<Merged> {
        let device = placement.main;
        // The sum W + scaling·B·A is formed in f32 whatever the stored dtype.
        let options = LoadOptions {
            precision: Precision::Fp32,
            ..self.args.compute.load_options(false)
        };
        let loaded = load_pretrained::<B::InnerBackend>(&self.dir, &options, &device)
            .with_context(|| format!("loading {}", self.dir.display()))?;
        if loaded.adapter_dir.is_none() {
            bail!(
                "{} is not a LoRA adapter directory (no adapter_config.json); nothing to merge",
                self.dir.display()
            );
        }
        let adapter_parameters = loaded.model.num_adapter_parameters();
        let model = loaded.model.merge_lora();
        let dtype = self
            .args
            .dtype
            .map_or(loaded.source_dtype, DtypeArg::storage);
        let save = SaveOptions {
            dtype: Some(dtype),
            max_shard_bytes: None,
            companions_from: Some(loaded.dir.clone()),
        };
        // Written to a staging directory inside --output, then moved into place, so that a
        // failure (a full disk) leaves the directory as it was.
        let output = &self.args.output;
        let staged = train_model::staging_dir(output)?;
        let written = save_pretrained(&model, Some(&loaded.raw_config), &staged, &save)
            .with_context(|| format!("saving {}", output.display()))
            // Tokenizer files saved with the adapter win over the base model's.
            .and_then(|saved| {
                copy_companions(&self.dir, &staged)?;
                train_model::install_model(&staged, output)?;
                Ok(saved)
            });
        let saved = match written {
            Ok(saved) => saved,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staged);
                return Err(e);
            }
        };
        Ok(Merged {
            base: loaded.dir,
            dtype: saved.dtype,
            bytes: saved.total_bytes,
            adapter_parameters,
        })
    }
}

/// Runs `train merge`.
pub fn run(args: &MergeArgs) -> Result<ExitCode> {
    let dir = crate::registry()?.resolve(&args.adapter)?;
    // Never into the adapter or its base model; into another model only with --yes.
    let mut inputs = vec![dir.clone()];
    if train_model::is_adapter_dir(&dir) {
        let adapter = train_model::read_adapter_config(&dir)?;
        inputs.push(train_model::resolve_base_model(
            &dir,
            adapter.base_model.as_deref(),
        )?);
    }
    let refs: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    train_model::check_output_dir(&args.output, &refs, args.yes, "--output")?;
    let merged = dispatch(
        args.compute.backend,
        args.compute.device.as_deref(),
        1,
        Merge {
            args,
            dir: dir.clone(),
        },
    )?;
    errln!(
        "merged {} adapter weights of {} into {} ({}, {} bytes of weights; base {})",
        merged.adapter_parameters,
        dir.display(),
        args.output.display(),
        merged.dtype.torch_name(),
        merged.bytes,
        merged.base.display()
    );
    if args.json {
        crate::print_json(&json!({
            "adapter": dir,
            "base": merged.base,
            "output": args.output,
            "dtype": merged.dtype.torch_name(),
            "weight_bytes": merged.bytes,
            "adapter_parameters": merged.adapter_parameters,
        }));
    }
    Ok(ExitCode::SUCCESS)
}
