//! `train export MODEL --format gguf --output FILE.gguf [--outtype f16|q8_0]`: a model
//! directory (or a registered name, or a Hub id) written as a llama.cpp GGUF file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use train_model::GgufOutType;

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum ExportFormat {
    Gguf,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum OutType {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
}

/// `train export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The model: a directory, a registered name or a Hugging Face Hub id. A LoRA adapter is
    /// exported after `train merge`.
    pub model: String,
    /// The file format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The file to write (replaced atomically; never a directory).
    #[arg(long)]
    pub output: PathBuf,
    /// The matrices' type: f16, or llama.cpp's 8-bit q8_0 (norms and biases stay f32).
    #[arg(long, value_enum, default_value_t = OutType::F16)]
    pub outtype: OutType,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `train export`.
pub fn run(args: &ExportArgs) -> Result<ExitCode> {
    let ExportFormat::Gguf = args.format;
    let dir = crate::registry()?.resolve(&args.model)?;
    if train_model::is_adapter_dir(&dir) {
        bail!(
            "{}: a LoRA adapter; merge it first (`train merge {} --output DIR`) and export DIR",
            dir.display(),
            args.model
        );
    }
    if args.output.is_dir() {
        bail!(
            "--output {}: a directory; give the GGUF file's path",
            args.output.display()
        );
    }
    // Never into the model's own directory: the file could replace one of its weights.
    let parent = args
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if let (Ok(p), Ok(d)) = (parent.canonicalize(), dir.canonicalize())
        && p.starts_with(&d)
    {
        bail!(
            "--output {}: inside the model directory {}, an input of this command; write the \
             GGUF file elsewhere",
            args.output.display(),
            dir.display()
        );
    }
    let outtype = match args.outtype {
        OutType::F16 => GgufOutType::F16,
        OutType::Q8_0 => GgufOutType::Q8_0,
    };
    let e = train_model::export_gguf(&dir, &args.output, outtype)?;
    outln!(
        "wrote {} ({} architecture, {} tensors, {:.1} MB)",
        e.path.display(),
        e.architecture,
        e.tensors,
        e.bytes as f64 / 1e6
    );
    for note in &e.notes {
        errln!("note: {note}");
    }
    if args.json {
        outln!(
            "{}",
            json!({"output": e.path, "architecture": e.architecture, "tensors": e.tensors, "bytes": e.bytes, "notes": e.notes})
        );
    }
    Ok(ExitCode::SUCCESS)
}
