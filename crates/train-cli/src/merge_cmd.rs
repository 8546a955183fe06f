//! `train merge ADAPTER --output DIR`: folds a LoRA adapter into its base model and saves a
//! plain model directory (PEFT's `merge_and_unload` + `save_pretrained`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::backend::AutodiffBackend;
use clap::Args;
use serde_json::json;
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

    fn run<B: AutodiffBackend>(self, placement: Placement<B>) -> Result<Merged> {
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
        let saved = save_pretrained(&model, Some(&loaded.raw_config), &self.args.output, &save)
            .with_context(|| format!("saving {}", self.args.output.display()))?;
        // Tokenizer files saved with the adapter win over the base model's.
        copy_companions(&self.dir, &self.args.output)?;
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
    let merged = dispatch(
        args.compute.backend,
        args.compute.device.as_deref(),
        1,
        false,
        Merge {
            args,
            dir: dir.clone(),
        },
    )?;
    eprintln!(
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
