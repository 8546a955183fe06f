//! Key/value cache for incremental decoding.

use burn::tensor::{Int, Tensor, backend::Backend};

use crate::error::{ModelError, Result};
use crate::model::{CausalLm, ModelInput};

/// Cached keys and values of one layer: `[batch, kv_heads, seq, head_dim]` each.
pub(crate) type LayerKv<B> = (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>);

/// The keys and values of every layer for the tokens seen so far, plus their segment ids.
///
/// Decoding token by token through [`CausalLm::forward_cached`] gives the same logits as one
/// full forward over the whole sequence. (With LongRoPE, each step's logits are those of a full
/// forward over the tokens so far, whose frequencies depend on their number, as in
/// `transformers`' generation.)
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerKv<B>>,
    segments: Option<Tensor<B, 2, Int>>,
    len: usize,
    batch: Option<usize>,
    /// Every token seen so far, kept only for a model whose rotary embedding depends on the
    /// length (LongRoPE), which recomputes the cache when decoding crosses that length.
    seen: Option<ModelInput<B>>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a model with `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![(None, None); num_layers],
            segments: None,
            len: 0,
            batch: None,
            seen: None,
        }
    }

    /// An empty cache sized for `model`.
    pub fn for_model(model: &CausalLm<B>) -> Self {
        Self::new(model.layers.len())
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything (start a new generation).
    pub fn reset(&mut self) {
        *self = Self::new(self.layers.len());
    }

    pub(crate) fn check(&self, model: &CausalLm<B>, input: &ModelInput<B>) -> Result<()> {
        if self.layers.len() != model.layers.len() {
            return Err(ModelError::InvalidInput(format!(
                "cache has {} layers, the model {}",
                self.layers.len(),
                model.layers.len()
            )));
        }
        let b = input.input_ids.dims()[0];
        if let Some(cached) = self.batch
            && cached != b
        {
            return Err(ModelError::InvalidInput(format!(
                "cache holds {cached} rows, the input {b}"
            )));
        }
        Ok(())
    }

    /// Appends the segment ids of new tokens; returns those of every cached key.
    pub(crate) fn push_segments(&mut self, new: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
        self.batch = Some(new.dims()[0]);
        let all = match self.segments.take() {
            Some(old) => Tensor::cat(vec![old, new], 1),
            None => new,
        };
        self.segments = Some(all.clone());
        all
    }

    /// Records `input` after the tokens seen so far; returns all of them.
    pub(crate) fn record(&mut self, input: &ModelInput<B>) -> ModelInput<B> {
        let [b, s] = input.input_ids.dims();
        let segments = input
            .segment_ids
            .clone()
            .unwrap_or_else(|| Tensor::zeros([b, s], &input.input_ids.device()));
        let all = match self.seen.take() {
            None => ModelInput {
                segment_ids: Some(segments),
                ..input.clone()
            },
            Some(old) => {
                let cat = |a: Tensor<B, 2, Int>, b: Tensor<B, 2, Int>| Tensor::cat(vec![a, b], 1);
                ModelInput {
                    input_ids: cat(old.input_ids, input.input_ids.clone()),
                    position_ids: cat(old.position_ids, input.position_ids.clone()),
                    segment_ids: old.segment_ids.map(|o| cat(o, segments)),
                }
            }
        };
        self.seen = Some(all.clone());
        all
    }

    /// Forgets the keys and values (not the tokens [`KvCache::record`] kept).
    pub(crate) fn clear_keys(&mut self) {
        let seen = self.seen.take();
        self.reset();
        self.seen = seen;
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerKv<B> {
        &mut self.layers[i]
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
