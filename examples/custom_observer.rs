//! A training observer defined outside the library: it writes every step and evaluation to a
//! CSV file while a small randomly initialised Llama trains on synthetic rows.
//!
//! ```sh
//! cargo run --release -p train-examples --example custom_observer [-- OUTPUT_DIR]
//! ```

use std::io::Write;
use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use burn::tensor::DType;
use train_data::Example;
use train_model::{CausalLm, FusedAutodiffBackend, ModelConfig};
use train_runner::{
    RunControl, RunInfo, RunSummary, TrainEvent, TrainObserver, TrainSetup, TrainerConfig, run,
};

/// Appends `kind,step,loss,learning_rate,grad_norm` rows to a CSV file.
struct CsvObserver {
    out: std::io::BufWriter<std::fs::File>,
    rows: usize,
}

impl CsvObserver {
    fn row(&mut self, line: std::fmt::Arguments<'_>) {
        // An observer must not stop training: a write error is reported, not propagated.
        if let Err(e) = writeln!(self.out, "{line}") {
            eprintln!("csv: {e}");
        }
        self.rows += 1;
    }
}

impl<B: FusedAutodiffBackend> TrainObserver<B> for CsvObserver {
    fn start(&mut self, info: &RunInfo) {
        println!(
            "training {} parameters for {} steps",
            info.parameters, info.total_steps
        );
        self.row(format_args!("kind,step,loss,learning_rate,grad_norm"));
    }
    fn update(&mut self, event: &TrainEvent<'_>) {
        match event {
            TrainEvent::Step(m) => self.row(format_args!(
                "train,{},{},{},{}",
                m.step, m.loss, m.learning_rate, m.grad_norm
            )),
            TrainEvent::Eval(e) => self.row(format_args!("eval,{},{},,", e.step, e.eval_loss)),
            _ => {}
        }
    }
    fn stop(&mut self, summary: &RunSummary) {
        self.row(format_args!(
            "end,{},{},,",
            summary.global_step,
            summary.train_loss.unwrap_or(f64::NAN)
        ));
        if let Err(e) = self.out.flush() {
            eprintln!("csv: {e}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    let output = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("train-rs-observer-{}", std::process::id())),
        PathBuf::from,
    );
    std::fs::create_dir_all(&output)?;
    let json = serde_json::json!({"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4});
    let config = ModelConfig::from_json("config.json".as_ref(), &json)?;
    let model =
        CausalLm::<Autodiff<Flex>>::random(&config, 0.02, 7, DType::F32, &Default::default())?;
    // Rows counting upwards: easy to learn, so the loss visibly falls.
    let rows = |n: usize| -> Vec<Example> {
        (0..n)
            .map(|row| {
                let ids: Vec<u32> = (0..12).map(|i| ((row + i) % 60) as u32 + 2).collect();
                Example {
                    row,
                    labels: ids.iter().map(|&t| t as i32).collect(),
                    input_ids: ids,
                }
            })
            .collect()
    };
    let trainer = TrainerConfig {
        output_dir: output.clone(),
        batch_size: 8,
        learning_rate: 3e-3,
        max_steps: Some(20),
        eval_steps: 10,
        ..TrainerConfig::default()
    };
    let setup = TrainSetup {
        model,
        raw_config: json,
        // A random model has no source directory: one without tokenizer files.
        companions_from: output.join("no-source"),
        source_dtype: train_model::StorageDtype::F32,
        train: train_data::TrainRows::one_per_example(&rows(64)),
        validation: rows(8),
        pad_id: 0,
        config: trainer,
        data_fingerprint: String::new(),
        overwrite: true,
        parallelism: train_runner::Parallelism::single(Default::default()),
        inputs: Vec::new(),
    };

    let csv = output.join("metrics.csv");
    let mut observer = CsvObserver {
        out: std::io::BufWriter::new(std::fs::File::create(&csv)?),
        rows: 0,
    };
    let summary = run(setup, None, &mut observer, &RunControl::new())?;
    println!(
        "{:?}; {} rows written to {}",
        summary.status,
        observer.rows,
        csv.display()
    );
    drop(observer);
    let text = std::fs::read_to_string(&csv)?;
    for line in text.lines().take(4).chain(text.lines().rev().take(2)) {
        println!("  {line}");
    }
    Ok(())
}
