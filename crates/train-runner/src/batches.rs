//! From prepared examples to the micro-batches of each optimizer step, in a deterministic,
//! resumable order.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use train_data::{Batch, DataPosition, EpochOrder, Sequence, TrainRows};
use train_model::ModelInput;

use crate::config::TrainerConfig;
use crate::objective::Collate;

/// The training rows (for supervised fine-tuning: examples, or packed rows of several
/// examples, as the data preparation built them) and their visiting order.
#[derive(Debug, Clone)]
pub struct BatchPlan<R = Sequence> {
    rows: Vec<R>,
    order: EpochOrder,
    batch_size: usize,
    accumulation: usize,
    pad_id: u32,
    /// Packing efficiency when packing, else `None`.
    pub packing_efficiency: Option<f64>,
}

impl BatchPlan<Sequence> {
    /// `train`'s rows in micro-batches of `config.batch_size`, `gradient_accumulation_steps`
    /// of them per step, visited in the order of `config.seed` and `config.shuffle`.
    pub fn new(train: TrainRows, config: &TrainerConfig, pad_id: u32) -> Self {
        let TrainRows {
            rows,
            packing_efficiency,
            ..
        } = train;
        let mut plan = Self::from_rows(rows, config, pad_id);
        plan.packing_efficiency = packing_efficiency;
        plan
    }
}

impl<R: Collate> BatchPlan<R> {
    /// `rows` in micro-batches of `config.batch_size`, `gradient_accumulation_steps` of them per
    /// step, visited in the order of `config.seed` and `config.shuffle`.
    pub fn from_rows(rows: Vec<R>, config: &TrainerConfig, pad_id: u32) -> Self {
        let order = EpochOrder {
            len: rows.len(),
            seed: config.seed,
            shuffle: config.shuffle,
        };
        Self {
            rows,
            order,
            batch_size: config.batch_size.max(1),
            accumulation: config.gradient_accumulation_steps.max(1),
            pad_id,
            packing_efficiency: None,
        }
    }

    /// Number of training rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when there is nothing to train on.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Micro-batches per epoch.
    pub fn micro_batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.batch_size)
    }

    /// Optimizer steps per epoch (the last one may have fewer micro-batches, as in
    /// `transformers`).
    pub fn steps_per_epoch(&self) -> usize {
        self.micro_batches_per_epoch()
            .div_ceil(self.accumulation)
            .max(1)
    }

    /// The micro-batches of the optimizer step starting at `position`, and the position after
    /// them. A step never spans two epochs.
    pub fn step_batches(&self, mut position: DataPosition) -> (Vec<R::Batch>, DataPosition) {
        if position.index >= self.rows.len() {
            position = DataPosition {
                epoch: position.epoch + 1,
                index: 0,
            };
        }
        let mut out = Vec::with_capacity(self.accumulation);
        for _ in 0..self.accumulation {
            if position.index >= self.rows.len() {
                break;
            }
            let (indices, next) = self.order.next_batch(position, self.batch_size);
            let rows: Vec<R> = indices.iter().map(|&i| self.rows[i].clone()).collect();
            out.push(R::collate(rows, self.pad_id));
            position = next;
        }
        (out, position)
    }

    /// Progress through the run in epochs (e.g. 1.5 = half-way through the second epoch).
    pub fn epoch_progress(&self, position: DataPosition) -> f64 {
        position.epoch as f64 + position.index as f64 / self.rows.len().max(1) as f64
    }
}

/// Tensors of a batch: the model input and the labels (`-100` = ignored).
pub fn batch_tensors<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (ModelInput<B>, Tensor<B, 2, Int>) {
    let shape = [batch.batch_size, batch.seq_len];
    let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, shape), device);
    let ids = int(batch.input_ids.iter().map(|&t| i64::from(t)).collect());
    let positions = int(batch.position_ids.iter().map(|&t| i64::from(t)).collect());
    let labels = int(batch.labels.iter().map(|&t| i64::from(t)).collect());
    // One example per row (padding after it): plain causal attention, no mask to build.
    let segments = batch
        .packed
        .then(|| int(batch.segment_ids.iter().map(|&t| i64::from(t)).collect()));
    (
        ModelInput {
            input_ids: ids,
            position_ids: positions,
            segment_ids: segments,
        },
        labels,
    )
}
