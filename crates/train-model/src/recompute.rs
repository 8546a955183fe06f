//! The training forward and its backward pass, with or without gradient checkpointing.
//!
//! Without checkpointing, a training forward is the plain forward on the autodiff graph: every
//! operation keeps what its backward needs until the backward pass. With it
//! ([`CausalLm::with_gradient_checkpointing`], `transformers`' `gradient_checkpointing_enable()`
//! per decoder layer), the layers run outside the graph and only each layer's input is kept;
//! [`Backprop::gradients`] then differentiates the loss down to the last layer's output and
//! walks the layers back, recomputing each one's forward on the graph from its saved input and
//! differentiating it alone, so that the activations held at any time are those of one layer.
//! The gradients are those of the plain path (the same operations, recomputed bit for bit).

use std::cell::RefCell;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, ElementConversion, Tensor};

use crate::fused::FusedAutodiffBackend;
use crate::lora::with_dropout_stream;
use crate::model::{CausalLm, LayerInputs, ModelInput, RouterCounts, RouterLog};

/// A training forward ([`CausalLm::forward_for_training`]): the final norm's output and the
/// router's load-balancing term on the autodiff graph, and how to differentiate a loss made
/// of them.
pub struct TrainingForward<B: AutodiffBackend> {
    /// Output of the final norm, `[batch, seq, hidden]` (the LM head's input).
    pub hidden: Tensor<B, 3>,
    /// The router's load-balancing loss before its coefficient, when it was asked for and the
    /// model is a mixture of experts ([`CausalLm::forward_hidden_with_router_loss`]).
    pub router_loss: Option<Tensor<B, 1>>,
    /// The backward pass of this forward.
    pub backprop: Backprop<B>,
}

/// The backward pass of a [`TrainingForward`].
pub struct Backprop<B: AutodiffBackend> {
    /// The layers to recompute (checkpointing); `None`: the whole forward is on the graph.
    layers: Option<LayerTape<B>>,
}

/// What a checkpointed forward keeps for its backward pass.
struct LayerTape<B: AutodiffBackend> {
    input: ModelInput<B>,
    /// The real tokens (the router's loss leaves padding out).
    real: Option<Vec<bool>>,
    /// The embeddings, on the graph (their backward keeps the token ids only).
    embeddings: Tensor<B, 3>,
    /// Each decoder layer's input.
    inputs: Vec<Tensor<B::InnerBackend, 3>>,
    /// The last layer's output: where the graph of the final norm and the loss starts.
    last: Tensor<B, 3>,
    /// The forward's router assignments and its load-balancing term as a graph leaf.
    router: Option<(RouterCounts, Tensor<B, 1>)>,
    /// The seed of the LoRA dropout masks (the recomputation draws the same ones).
    dropout: Option<u64>,
}

impl<B: FusedAutodiffBackend> CausalLm<B> {
    /// The forward pass of a training step: the final norm's output (and, with `router_loss`,
    /// the router's load-balancing term of a mixture of experts over the `real` tokens) on the
    /// autodiff graph, and the [`Backprop`] that turns a scalar loss computed from them into the
    /// parameters' gradients. With [`CausalLm::gradient_checkpointing`] the decoder layers run
    /// outside the graph and are recomputed one at a time by the backward pass.
    pub fn forward_for_training(
        &self,
        input: &ModelInput<B>,
        real: Option<&[bool]>,
        router_loss: bool,
    ) -> TrainingForward<B> {
        let routed = router_loss && self.config.moe.is_some();
        if !self.gradient_checkpointing {
            let (hidden, router_loss) = if routed {
                self.forward_hidden_with_router_loss(input, real)
            } else {
                (self.forward_hidden(input), None)
            };
            return TrainingForward {
                hidden,
                router_loss,
                backprop: Backprop { layers: None },
            };
        }
        let embeddings = self.embed(input);
        let plain = input.inner();
        let around = LayerInputs::new(&self.config, self.attention, &plain, None);
        let device = plain.input_ids.device();
        let log = routed.then(|| RefCell::new(RouterLog::new(real, &device)));
        // LoRA dropout: the masks of each layer from a stream of its own, drawn again
        // identically when the layer is recomputed (the stream's seed from the trainer's
        // dropout stream, or else the backend's generator, as the masks without checkpointing).
        let dropout = self.lora.as_ref().filter(|l| l.dropout > 0.0).map(|_| {
            if let Some(seed) = crate::lora::next_dropout_seed(true) {
                return seed;
            }
            let bits =
                Tensor::<B::InnerBackend, 1>::random([2], Distribution::Uniform(0.0, 1.0), &device);
            let v: Vec<f32> = bits.into_data().iter::<f32>().collect();
            (u64::from(v[0].to_bits()) << 32) | u64::from(v[1].to_bits())
        });
        let mut x = embeddings.clone().inner();
        let mut inputs = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            inputs.push(x.clone());
            let context = around.context(&self.config, i, log.as_ref());
            let layer = layer.valid();
            x = in_stream(dropout, i, || layer.forward(x, &context, None));
        }
        let last = Tensor::<B, 3>::from_inner(x).require_grad();
        let hidden = self.norm.apply(last.clone(), around.fused);
        let router = log.and_then(|log| {
            let log = log.into_inner();
            let counts = log.counts();
            let loss = Tensor::<B, 1>::from_inner(log.loss()?).require_grad();
            Some((counts, loss))
        });
        TrainingForward {
            hidden,
            router_loss: router.as_ref().map(|(_, loss)| loss.clone()),
            backprop: Backprop {
                layers: Some(LayerTape {
                    input: input.clone(),
                    real: real.map(<[bool]>::to_vec),
                    embeddings,
                    inputs,
                    last,
                    router,
                    dropout,
                }),
            },
        }
    }
}

impl<B: FusedAutodiffBackend> Backprop<B> {
    /// The gradients of `model`'s parameters (the model that ran the forward) from `loss`, a
    /// scalar computed from the forward's outputs.
    pub fn gradients(self, model: &CausalLm<B>, loss: &Tensor<B, 1>) -> GradientsParams {
        let Some(tape) = self.layers else {
            return GradientsParams::from_grads(loss.backward(), model);
        };
        let mut grads = loss.backward();
        let mut upstream = tape.last.grad_remove(&mut grads);
        // d loss / d (the router's term): each layer's share of the term is differentiated
        // with that weight when the layer is recomputed.
        let router = tape.router.and_then(|(counts, leaf)| {
            let weight: f64 = leaf.grad_remove(&mut grads)?.into_scalar().elem();
            Some((counts, weight))
        });
        let mut out = GradientsParams::from_grads(grads, model);
        let around = LayerInputs::new(&model.config, model.attention, &tape.input, None);
        let device = tape.input.input_ids.device();
        let mut inputs = tape.inputs;
        for (i, layer) in model.layers.iter().enumerate().rev() {
            let Some(saved) = inputs.pop() else { break };
            let x = Tensor::<B, 3>::from_inner(saved).require_grad();
            let log = router
                .as_ref()
                .map(|_| RefCell::new(RouterLog::new(tape.real.as_deref(), &device)));
            let context = around.context(&model.config, i, log.as_ref());
            let y = in_stream(tape.dropout, i, || layer.forward(x.clone(), &context, None));
            let dtype = y.dtype();
            let g = upstream.unwrap_or_else(|| Tensor::zeros(y.dims(), (&device, dtype)));
            let mut surrogate = (y * Tensor::from_inner(g)).sum();
            if let (Some((counts, weight)), Some(log)) = (&router, log)
                && let Some(term) = log.into_inner().loss_with(counts)
            {
                surrogate = surrogate + term.mul_scalar(*weight).cast(dtype);
            }
            let mut grads = surrogate.backward();
            upstream = x.grad_remove(&mut grads);
            merge(layer, GradientsParams::from_grads(grads, layer), &mut out);
        }
        // (A frozen table leaves the embeddings off the graph.)
        if let Some(g) = upstream
            && model.embed_tokens.val().is_require_grad()
        {
            let mut grads = (tape.embeddings * Tensor::from_inner(g)).sum().backward();
            let table = &model.embed_tokens;
            if let Some(g) = table.val().grad_remove(&mut grads) {
                add_grad(&mut out, table, g);
            }
        }
        out
    }
}

/// `f` (layer `layer`'s forward) in the layer's LoRA dropout stream, if any.
fn in_stream<R>(dropout: Option<u64>, layer: usize, f: impl FnOnce() -> R) -> R {
    match dropout {
        Some(seed) => with_dropout_stream(crate::lora::layer_stream_seed(seed, layer), f),
        None => f(),
    }
}

/// Moves the gradients of `module`'s parameters from `from` into `into`, adding them to any
/// already there.
fn merge<B: AutodiffBackend, M: Module<B>>(
    module: &M,
    mut from: GradientsParams,
    into: &mut GradientsParams,
) {
    struct Merge<'a> {
        from: &'a mut GradientsParams,
        into: &'a mut GradientsParams,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Merge<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.from.remove::<B::InnerBackend, D>(param.id) {
                add_grad(self.into, param, g);
            }
        }
    }
    module.visit(&mut Merge {
        from: &mut from,
        into,
    });
}

/// Adds `g` to `param`'s gradient in `grads`.
fn add_grad<B: AutodiffBackend, const D: usize>(
    grads: &mut GradientsParams,
    param: &Param<Tensor<B, D>>,
    g: Tensor<B::InnerBackend, D>,
) {
    let total = match grads.remove::<B::InnerBackend, D>(param.id) {
        Some(earlier) => earlier + g,
        None => g,
    };
    grads.register::<B::InnerBackend, D>(param.id, total);
}

#[cfg(test)]
#[cfg(feature = "cpu")]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::backend::Backend;

    use crate::{LoadOptions, LoraConfig, Precision, load_pretrained};

    type Ad = Autodiff<Flex>;

    /// The llama fixture in f32 with LoRA adapters (dropout 0.5) whose `B` is not zero, so
    /// that the masks change the forward.
    fn lora_model(device: &burn::tensor::Device<Ad>) -> CausalLm<Ad> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
        let options = LoadOptions {
            precision: Precision::Fp32,
            ..LoadOptions::default()
        };
        let config = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.5,
            target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            ..LoraConfig::default()
        };
        let mut model = load_pretrained::<Ad>(&dir, &options, device)
            .unwrap()
            .model
            .with_lora(&config, 1)
            .unwrap();
        for layer in &mut model.layers {
            for (_, p) in layer.projections_mut() {
                if let Some(lora) = p.lora.as_mut() {
                    let shape = lora.b.val().shape();
                    let b = Tensor::random(shape, Distribution::Normal(0.0, 0.5), device);
                    lora.b = Param::from_tensor(b).set_require_grad(true);
                }
            }
        }
        model
    }

    /// A scalar of the final hidden states that weighs every position differently.
    fn scalar(hidden: Tensor<Ad, 3>) -> Tensor<Ad, 1> {
        let dims = hidden.dims();
        let n = dims.iter().product::<usize>();
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.4)
            .collect();
        let w =
            Tensor::<Ad, 3>::from_data(burn::tensor::TensorData::new(w, dims), &hidden.device());
        (hidden * w).sum()
    }

    fn input(device: &burn::tensor::Device<Ad>) -> ModelInput<Ad> {
        let rows: Vec<Vec<u32>> = (0..2)
            .map(|r| (0..11).map(|t| (r * 37 + t * 13) % 800 + 3).collect())
            .collect();
        ModelInput::from_rows(&rows, device).unwrap()
    }

    /// LoRA dropout under gradient checkpointing: the recomputed layers draw the masks of the
    /// forward, so the gradients are those of one forward on the graph with those masks; the
    /// masks apply (another seed, another loss).
    #[test]
    fn checkpointed_lora_dropout_recomputes_the_same_masks() {
        let device = Default::default();
        let model = lora_model(&device).with_gradient_checkpointing(true);
        let input = input(&device);

        Ad::seed(&device, 5);
        let forward = model.forward_for_training(&input, None, false);
        let loss = scalar(forward.hidden);
        let value: f32 = loss.clone().into_scalar();
        let got = forward.backprop.gradients(&model, &loss);

        // The same forward on the graph, each layer in the stream the checkpointed one used.
        Ad::seed(&device, 5);
        let bits = Tensor::<Flex, 1>::random([2], Distribution::Uniform(0.0, 1.0), &device);
        let v: Vec<f32> = bits.into_data().iter::<f32>().collect();
        let seed = (u64::from(v[0].to_bits()) << 32) | u64::from(v[1].to_bits());
        let around = LayerInputs::new(&model.config, model.attention, &input, None);
        let mut x = model.embed(&input);
        for (i, layer) in model.layers.iter().enumerate() {
            let context = around.context(&model.config, i, None);
            x = in_stream(Some(seed), i, || layer.forward(x, &context, None));
        }
        let loss = scalar(model.norm.apply(x, around.fused));
        let expected_value: f32 = loss.clone().into_scalar();
        let expected = GradientsParams::from_grads(loss.backward(), &model);
        assert!(
            (value - expected_value).abs() <= 1e-5 * expected_value.abs(),
            "{value} vs {expected_value}"
        );
        let mut compared = 0;
        for layer in &model.layers {
            for (name, p) in layer.projections() {
                let Some(lora) = p.lora.as_ref() else {
                    continue;
                };
                for param in [&lora.a, &lora.b] {
                    let a = got.get::<Flex, 2>(param.id).expect("a gradient");
                    let b = expected.get::<Flex, 2>(param.id).expect("a gradient");
                    let scale: f32 = b.clone().abs().max().into_scalar();
                    let diff: f32 = (a - b).abs().max().into_scalar();
                    assert!(diff <= 1e-5 * scale.max(1e-12), "{name}: {diff} of {scale}");
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, 2 * 3 * model.layers.len());

        // Another seed draws other masks.
        Ad::seed(&device, 6);
        let other: f32 =
            scalar(model.forward_for_training(&input, None, false).hidden).into_scalar();
        assert!(
            (other - value).abs() > 1e-3 * value.abs(),
            "{other} vs {value}"
        );
    }
}
