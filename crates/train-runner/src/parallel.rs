//! Data parallelism with burn's collective engine (`burn::collective`, burn's `collective`
//! feature; never its `distributed` feature): the micro-batches of an optimizer step are split
//! over several workers, each computes the gradients of its share on its own device with its
//! own replica of the model, and the gradients are summed across workers by an all-reduce.
//!
//! Every micro-batch's loss is divided by the label tokens of the **whole step** (all workers),
//! so the summed gradients and loss are those of one worker running every micro-batch: the
//! result equals single-device training up to float summation order. The replicas are forked
//! from the one model before each step, so every worker sees the same weights, and the one
//! optimizer applies the reduced gradients.

use burn::collective::{self, CollectiveConfig, PeerId, ReduceOperation};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorPrimitive};
use train_model::CausalLm;

use crate::error::{Result, RunnerError};
use crate::trainer::gradients_over;

/// The loss and gradients of one optimizer step over `batches`, computed by one worker per
/// device in `devices` (micro-batch `i` goes to worker `i mod n`). The gradients are returned on
/// `devices[0]`; the loss is the step's mean over its label tokens, as [`crate::step_gradients`].
pub fn parallel_step_gradients<B: AutodiffBackend>(
    model: &CausalLm<B>,
    batches: &[train_data::Batch],
    devices: &[burn::tensor::Device<B>],
) -> Result<(f64, GradientsParams)> {
    let n = devices.len();
    let label_tokens: usize = batches.iter().map(|b| b.label_tokens).sum();
    let denominator = label_tokens.max(1) as f64;
    if n <= 1 {
        let device = match devices.first() {
            Some(d) => d.clone(),
            None => model.embed_tokens.val().device(),
        };
        return Ok(gradients_over(model, batches, denominator, &device));
    }
    let config = CollectiveConfig::default().with_num_devices(n);
    collective::reset_collective::<B::InnerBackend>();
    let results: Vec<Result<(f64, GradientsParams)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                let replica = model.clone().fork(device);
                let share: Vec<train_data::Batch> =
                    batches.iter().skip(rank).step_by(n).cloned().collect();
                let config = config.clone();
                scope.spawn(move || worker(rank, &replica, &share, denominator, device, config))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(RunnerError::Parallel(
                        "a data-parallel worker panicked".into(),
                    ))
                })
            })
            .collect()
    });
    let mut loss = 0.0;
    let mut first = None;
    for (rank, r) in results.into_iter().enumerate() {
        let (l, grads) = r?;
        loss += l;
        if rank == 0 {
            first = Some(grads);
        }
    }
    first
        .map(|g| (loss, g))
        .ok_or_else(|| RunnerError::Parallel("no worker".into()))
}

fn worker<B: AutodiffBackend>(
    rank: usize,
    replica: &CausalLm<B>,
    share: &[train_data::Batch],
    denominator: f64,
    device: &burn::tensor::Device<B>,
    config: CollectiveConfig,
) -> Result<(f64, GradientsParams)> {
    let peer = PeerId::from(rank);
    let fail = |what: &str, e: collective::CollectiveError| {
        // Wake the other workers, which would otherwise wait for this one forever.
        collective::reset_collective::<B::InnerBackend>();
        RunnerError::Parallel(format!("worker {rank}: {what}: {e:?}"))
    };
    collective::register::<B::InnerBackend>(peer, device.clone(), config)
        .map_err(|e| fail("register", e))?;
    let (loss, mut grads) = gradients_over(replica, share, denominator, device);
    let mut reduce = SumGradients::<B> {
        grads: &mut grads,
        peer,
        error: None,
        _backend: std::marker::PhantomData,
    };
    replica.visit(&mut reduce);
    if let Some(e) = reduce.error {
        return Err(fail("all-reduce", e));
    }
    collective::finish_collective::<B::InnerBackend>(peer).map_err(|e| fail("finish", e))?;
    Ok((loss, grads))
}

/// Sums every trained parameter's gradient across the workers, in the module's visiting order
/// (the same on every worker); a worker without a gradient for it (no micro-batch of its own)
/// contributes zeros, so that every worker makes the same calls.
struct SumGradients<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    peer: PeerId,
    error: Option<collective::CollectiveError>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SumGradients<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() || !param.is_require_grad() {
            return;
        }
        let grad = self
            .grads
            .remove::<B::InnerBackend, D>(param.id)
            .unwrap_or_else(|| param.val().inner().zeros_like());
        match collective::all_reduce::<B::InnerBackend>(
            self.peer,
            grad.into_primitive().tensor(),
            ReduceOperation::Sum,
        ) {
            Ok(sum) => self.grads.register::<B::InnerBackend, D>(
                param.id,
                Tensor::from_primitive(TensorPrimitive::Float(sum)),
            ),
            Err(e) => self.error = Some(e),
        }
    }
}
