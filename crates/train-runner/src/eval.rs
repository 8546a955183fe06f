//! Evaluation: mean cross-entropy over every label token of a set of examples.

use burn::tensor::ElementConversion;
use train_data::{Batch, Example};
use train_model::{CausalLm, FusedBackend, causal_lm_nll};

use crate::batches::batch_tensors;

/// Sum of the negative log-likelihoods and number of label tokens over `examples`, in
/// micro-batches of `batch_size` padded rows (examples sorted by length so that little padding
/// is computed; the sums do not depend on the grouping).
pub fn evaluate<B: FusedBackend>(
    model: &CausalLm<B>,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> (f64, u64) {
    let device = model.embed_tokens.val().device();
    let mut order: Vec<&Example> = examples.iter().collect();
    order.sort_by_key(|e| e.len());
    let (mut sum, mut tokens) = (0f64, 0u64);
    for chunk in order.chunks(batch_size.max(1)) {
        let mut batch = Batch::padded(chunk, pad_id);
        if batch.label_tokens == 0 {
            continue;
        }
        if model.padding_free()
            && let Some(flat) = batch.padding_free()
        {
            batch = flat;
        }
        let (input, labels) = batch_tensors::<B>(&batch, &device);
        let (s, _) = causal_lm_nll(model.forward(&input), labels);
        sum += f64::from(s.into_scalar().elem::<f32>());
        tokens += batch.label_tokens as u64;
    }
    (sum, tokens)
}
