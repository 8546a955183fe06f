//! The library path of the main job: load a checkpoint, prepare the data, train with a
//! monitor (status file, plots, report), save the model.
//!
//! ```sh
//! cargo run --release -p train-examples --example finetune [-- OUTPUT_DIR]
//! ```

use std::path::PathBuf;

use burn::backend::{Autodiff, Flex};
use train_data::{ChatTokenizer, DatasetConfig, prepare};
use train_model::{FusedAutodiffBackend, LoadOptions, load_pretrained};
use train_monitor::{MonitoringBundle, MonitoringConfig, RunEnd, RunStart, Status};
use train_runner::{MetricsObserver, Observers, RunControl, RunInfo, RunStatus, RunSummary};
use train_runner::{TrainEvent, TrainObserver, TrainSetup, TrainerConfig, run};

type Backend = Autodiff<Flex>; // or Autodiff<LibTorch>, Autodiff<Cuda> with the crate features

fn main() -> anyhow::Result<()> {
    // The repository's root, for its tiny model and data (in your own project: your clone).
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model_dir = root.join("crates/train-model/tests/fixtures/qwen3");
    let output = std::env::args().nth(1).map_or_else(
        || std::env::temp_dir().join(format!("train-rs-finetune-{}", std::process::id())),
        PathBuf::from,
    );

    // Data: the shipped conversations, rendered with the model's chat template and masked.
    let tokenizer = ChatTokenizer::from_model_dir(&model_dir)?;
    let data = DatasetConfig {
        dataset_path: root.join("crates/train-data/tests/fixtures/sample.jsonl"),
        max_length: 512,
        ..DatasetConfig::default()
    };
    let prepared = prepare(&data, &tokenizer, None)?;
    println!(
        "{} training / {} validation examples",
        prepared.train.len(),
        prepared.validation.len()
    );

    // The model and the trainer's settings (the rest keeps the seed's defaults).
    let device = Default::default();
    let source = load_pretrained::<Backend>(&model_dir, &LoadOptions::default(), &device)?;
    let config = TrainerConfig {
        output_dir: output.clone(),
        batch_size: 8,
        learning_rate: 1e-3,
        max_steps: Some(12),
        eval_steps: 6,
        ..TrainerConfig::default()
    };
    let setup = TrainSetup::new(
        source,
        prepared.rows,
        prepared.validation,
        tokenizer.pad_id(),
        config,
    );

    // Train, feeding the monitor and metrics.jsonl; the final model is saved in OUTPUT
    // (checkpoints beside it).
    let mut monitor = Monitor(MonitoringBundle::new(MonitoringConfig::new(
        output.join("status"),
        Some(output.clone()),
    )));
    let mut metrics = MetricsObserver::new();
    let mut observers = Observers::default();
    observers.push(&mut monitor);
    observers.push(&mut metrics);
    let summary = run(setup, None, &mut observers, &RunControl::new())?;
    println!(
        "{:?} after {} steps: train loss {:.3}, eval loss {:.3}, model in {}",
        summary.status,
        summary.global_step,
        summary.train_loss.unwrap_or(f64::NAN),
        summary.eval_loss.unwrap_or(f64::NAN),
        output.display()
    );
    Ok(())
}

/// Runner events → `train-monitor` (status file, alerts, plots and report.html).
struct Monitor(MonitoringBundle);

impl<B: FusedAutodiffBackend> TrainObserver<B> for Monitor {
    fn start(&mut self, info: &RunInfo) {
        let start = RunStart {
            total_steps: info.total_steps,
            start_step: info.start_step,
            output_dir: info.output_dir.clone(),
            history: Default::default(),
        };
        report(self.0.start(start));
    }
    fn update(&mut self, event: &TrainEvent<'_>) {
        match event {
            TrainEvent::Step(m) => {
                println!(
                    "step {:>3}  loss {:.4}  {:.0} tokens/s",
                    m.step, m.loss, m.tokens_per_sec
                );
                let alerts = self.0.step(m);
                report(alerts.map(|a| a.iter().for_each(|a| println!("alert: {}", a.message))));
            }
            TrainEvent::Eval(e) => report(self.0.eval(e)),
            _ => {}
        }
    }
    fn stop(&mut self, summary: &RunSummary) {
        let status = if summary.status == RunStatus::Completed {
            Status::Completed
        } else {
            Status::Crashed
        };
        report(self.0.stop(&RunEnd {
            status,
            step: summary.global_step,
            error: summary.error.clone(),
        }));
    }
}

fn report(result: train_monitor::Result<()>) {
    if let Err(e) = result {
        eprintln!("monitor: {e}"); // monitoring problems never stop training
    }
}
