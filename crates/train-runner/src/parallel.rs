//! Data parallelism with burn's collective engine (`burn::collective`, burn's `collective`
//! feature; never its `distributed` feature): the micro-batches of an optimizer step are split
//! over several workers, each computes the gradients of its share on its own device with its
//! own replica of the model, and the gradients are summed across workers by an all-reduce.
//! The workers can be on one machine (several devices, or several CPU workers) and on several
//! machines ([`Cluster`]: burn's global collective, coordinated by its orchestrator, which
//! `train orchestrator` runs).
//!
//! Every micro-batch's loss is divided by the label tokens of the **whole step** (all workers
//! of all machines: every machine builds the same batches from the same data and seed and takes
//! its share), so the summed gradients and loss are those of one worker running every
//! micro-batch: the result equals single-device training up to float summation order. The
//! replicas are forked from the one model before each step, so every worker sees the same
//! weights, and each machine's one optimizer applies the same reduced gradients.

use burn::collective::{
    self, AllReduceStrategy, CollectiveConfig, CollectiveError, PeerId, ReduceOperation,
};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use serde::{Deserialize, Serialize};
use train_model::CausalLm;
use train_model::FusedAutodiffBackend;

use crate::error::{Result, RunnerError};
use crate::objective::{Contribution, NextToken, Objective};
use crate::step::gradients_over;
use train_data::SplitMix64;

/// This machine's place in a multi-machine run (`nodes` machines, each running as many workers
/// as [`Parallelism`] gives devices). Every machine runs the same command with the same data,
/// except for `node_rank` and `node_address`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Machines in the run (the global batch is multiplied by it).
    pub nodes: usize,
    /// This machine's rank, `0..nodes`: it takes the micro-batches of global workers
    /// `node_rank × devices ..`.
    pub node_rank: usize,
    /// The orchestrator every machine connects to, `ws://HOST:PORT` (`train orchestrator --port
    /// PORT` on one of them, or `burn::collective::start_global_orchestrator`).
    pub orchestrator: String,
    /// Where the other machines reach this one's tensor service, `ws://HOST:PORT`; it listens on
    /// that port on every interface.
    pub node_address: String,
}

impl Cluster {
    /// Checks the number of machines, the rank and the addresses, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        let nodes = self.nodes;
        if nodes == 0 || nodes > crate::config::limits::MAX_NODES {
            return Err(RunnerError::config(
                "nodes",
                format!(
                    "{nodes} is outside 1..={}",
                    crate::config::limits::MAX_NODES
                ),
            ));
        }
        if self.node_rank >= nodes {
            return Err(RunnerError::config(
                "node_rank",
                format!("{} is not below the {nodes} nodes", self.node_rank),
            ));
        }
        ws_address("orchestrator", &self.orchestrator)?;
        ws_address("node_address", &self.node_address)?;
        Ok(())
    }
}

/// How a run spreads over workers, one value checked once ([`Parallelism::new`]): this
/// machine's devices (one data-parallel worker each) and, in a run over several machines, its
/// place in the [`Cluster`]. Each optimizer step runs `gradient_accumulation_steps`
/// micro-batches of `batch_size` on every worker, so the global batch is
/// `batch_size × gradient_accumulation_steps × workers` (Trainer's semantics).
#[derive(Debug, Clone)]
pub struct Parallelism<B: burn::tensor::backend::Backend> {
    devices: Vec<burn::tensor::Device<B>>,
    cluster: Option<Cluster>,
}

impl<B: burn::tensor::backend::Backend> Parallelism<B> {
    /// One worker on `device`, one machine.
    pub fn single(device: burn::tensor::Device<B>) -> Self {
        Self {
            devices: vec![device],
            cluster: None,
        }
    }

    /// One worker per device of `devices` on this machine (several CPU workers may share a
    /// device), and `cluster` for a run over several machines. Refused, naming the field: no
    /// device, more than `limits::MAX_DEVICES`, a cluster whose settings are wrong.
    pub fn new(devices: Vec<burn::tensor::Device<B>>, cluster: Option<Cluster>) -> Result<Self> {
        let max = crate::config::limits::MAX_DEVICES;
        if devices.is_empty() || devices.len() > max {
            return Err(RunnerError::config(
                "devices",
                format!("{} workers is outside 1..={max}", devices.len()),
            ));
        }
        if let Some(c) = &cluster {
            c.validate()?;
        }
        Ok(Self { devices, cluster })
    }

    /// This machine's devices, one per worker.
    pub fn devices(&self) -> &[burn::tensor::Device<B>] {
        &self.devices
    }

    /// This machine's place in a multi-machine run.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Machines in the run.
    pub fn nodes(&self) -> usize {
        self.cluster.as_ref().map_or(1, |c| c.nodes)
    }

    /// Workers of the whole run (devices × machines): the global batch's multiplier.
    pub fn workers(&self) -> usize {
        self.devices.len() * self.nodes()
    }
}

/// `HOST:PORT` or `ws://HOST:PORT` → (`ws://HOST:PORT`, PORT).
fn ws_address(field: &str, address: &str) -> Result<(String, u16)> {
    let rest = address.strip_prefix("ws://").unwrap_or(address);
    let bad = || {
        RunnerError::config(
            field,
            format!("`{address}` is not HOST:PORT (optionally ws://HOST:PORT)"),
        )
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains('/') || port == 0 {
        return Err(bad());
    }
    Ok((format!("ws://{rest}"), port))
}

/// The loss and gradients of one optimizer step over `batches`, computed by one worker per
/// device in `devices` (micro-batch `i` goes to worker `i mod n`). The gradients are returned on
/// `devices[0]`; the loss is the step's mean over its label tokens, as [`crate::step_gradients`].
pub fn parallel_step_gradients<B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    batches: &[train_data::Batch],
    devices: &[burn::tensor::Device<B>],
) -> Result<(f64, GradientsParams)> {
    if devices.len() <= 1 {
        let label_tokens: usize = batches.iter().map(|b| b.label_tokens).sum();
        let device = match devices.first() {
            Some(d) => d.clone(),
            None => model.embed_tokens.val().device(),
        };
        let (loss, grads, _) = gradients_over(model, batches, label_tokens.max(1) as f64, &device);
        return Ok((loss, grads));
    }
    let session = DataParallel::start(&Parallelism::new(devices.to_vec(), None)?)?;
    let objective = NextToken {
        validation: &[],
        eval_batch_size: 1,
        pad_id: 0,
    };
    let outcome = session.step(&objective, model, batches, false)?;
    session.finish()?;
    Ok((outcome.loss, outcome.grads))
}

/// One optimizer step's result across every worker of every machine.
pub struct StepOutcome {
    /// The step's loss (mean over all its label tokens).
    pub loss: f64,
    /// The objective's metrics of the step (means over its units), in
    /// [`Objective::metric_names`] order, then the router's term when the model adds one (see
    /// [`crate::Contribution::metrics`]).
    pub metrics: Vec<f64>,
    /// The summed gradients, on this machine's first device.
    pub grads: GradientsParams,
    /// Some machine asked to stop (its stop request at the time of this step): every machine
    /// learns it at the same step, so that all stop together.
    pub stop: bool,
}

/// A data-parallel session: this machine's workers registered with burn's collective engine
/// (and, for several machines, with the orchestrator) for a whole run.
pub struct DataParallel<B: FusedAutodiffBackend> {
    devices: Vec<burn::tensor::Device<B>>,
    first_rank: usize,
    world: usize,
    open: bool,
}

impl<B: FusedAutodiffBackend> DataParallel<B> {
    /// Registers one worker per device of `parallelism`; with a cluster, this machine is node
    /// `cluster.node_rank` of `cluster.nodes`, and this waits until every machine has joined.
    pub fn start(parallelism: &Parallelism<B>) -> Result<Self> {
        let devices = parallelism.devices().to_vec();
        let nodes = parallelism.nodes();
        let n = devices.len();
        let mut config = CollectiveConfig::default().with_num_devices(n);
        let mut first_rank = 0;
        if let Some(cluster) = parallelism.cluster() {
            let (orchestrator, _) = ws_address("orchestrator", &cluster.orchestrator)?;
            let (node_address, port) = ws_address("node_address", &cluster.node_address)?;
            // burn's tensor service only logs a failure to listen (and the other machines would
            // then reach whatever holds the port): find it out here.
            drop(std::net::TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                RunnerError::config(
                    "node_address",
                    format!("cannot listen on port {port} of this machine: {e}"),
                )
            })?);
            let parse = |field: &str, a: &str| {
                a.parse()
                    .map_err(|e: String| RunnerError::config(field, format!("`{a}`: {e}")))
            };
            let nodes_u32 = u32::try_from(nodes)
                .map_err(|_| RunnerError::config("nodes", format!("{nodes} is too many")))?;
            config = config
                .with_num_nodes(nodes_u32)
                .with_global_address(parse("orchestrator", &orchestrator)?)
                .with_node_address(parse("node_address", &node_address)?)
                .with_data_service_port(port)
                // The ring strategy cannot reduce tensors with fewer rows than machines.
                .with_global_all_reduce_strategy(AllReduceStrategy::Tree(2));
            first_rank = cluster.node_rank * n;
        }
        collective::reset_collective::<B::InnerBackend>();
        let session = Self {
            world: n * nodes,
            devices,
            first_rank,
            open: true,
        };
        // Registering blocks until every local worker (and every machine) has registered.
        let registered: Vec<std::result::Result<(), CollectiveError>> = std::thread::scope(|s| {
            let handles: Vec<_> = session
                .devices
                .iter()
                .enumerate()
                .map(|(rank, device)| {
                    let config = config.clone();
                    s.spawn(move || {
                        collective::register::<B::InnerBackend>(
                            PeerId::from(rank),
                            device.clone(),
                            config,
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(CollectiveError::Other("panicked".into())))
                })
                .collect()
        });
        for (rank, r) in registered.into_iter().enumerate() {
            r.map_err(|e| failure(rank, "joining the data-parallel group", &e))?;
        }
        Ok(session)
    }

    /// The loss of `objective` and summed gradients of one optimizer step over `batches` (the
    /// micro-batches of the whole step, on every machine): global worker `r` takes
    /// micro-batches `r, r + world, …`. `stop` is this machine's stop request, shared with the
    /// others. LoRA dropout masks come from the backend's generator ([`Self::step_seeded`]
    /// draws them from a seed).
    pub fn step<O: Objective<B>>(
        &self,
        objective: &O,
        model: &CausalLm<B>,
        batches: &[O::Batch],
        stop: bool,
    ) -> Result<StepOutcome> {
        self.step_seeded(objective, model, batches, stop, None)
    }

    /// [`Self::step`], each worker's LoRA dropout masks drawn from a stream of
    /// `dropout_seed` and its global rank when given ([`train_model::with_lora_dropout_seed`]).
    pub fn step_seeded<O: Objective<B>>(
        &self,
        objective: &O,
        model: &CausalLm<B>,
        batches: &[O::Batch],
        stop: bool,
        dropout_seed: Option<u64>,
    ) -> Result<StepOutcome> {
        let units: usize = batches.iter().map(|b| objective.units(b)).sum();
        let denominator = units.max(1) as f64;
        let results: Vec<Result<StepOutcome>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .devices
                .iter()
                .enumerate()
                .map(|(rank, device)| {
                    let replica = model.clone().fork(device);
                    let share: Vec<&O::Batch> = batches
                        .iter()
                        .skip(self.first_rank + rank)
                        .step_by(self.world)
                        .collect();
                    let place = Place {
                        rank,
                        global_rank: self.first_rank + rank,
                        world: self.world,
                    };
                    scope.spawn(move || {
                        let work = || {
                            worker(
                                objective,
                                place,
                                &replica,
                                &share,
                                denominator,
                                device,
                                stop && rank == 0,
                            )
                        };
                        // Each worker's LoRA dropout masks from the step's seed and its rank.
                        match dropout_seed {
                            Some(seed) => train_model::with_lora_dropout_seed(
                                worker_dropout_seed(seed, place.global_rank),
                                work,
                            ),
                            None => work(),
                        }
                    })
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
        let mut first = None;
        for r in results {
            let outcome = r?;
            first.get_or_insert(outcome);
        }
        first.ok_or_else(|| RunnerError::Parallel("no worker".into()))
    }

    /// Leaves the group (and the orchestrator), at the end of the run.
    pub fn finish(mut self) -> Result<()> {
        self.open = false;
        for rank in 0..self.devices.len() {
            collective::finish_collective::<B::InnerBackend>(PeerId::from(rank))
                .map_err(|e| failure(rank, "leaving the data-parallel group", &e))?;
        }
        Ok(())
    }
}

impl<B: FusedAutodiffBackend> Drop for DataParallel<B> {
    fn drop(&mut self) {
        if self.open {
            // A run that failed: forget its workers so that a next session starts clean.
            collective::reset_collective::<B::InnerBackend>();
        }
    }
}

fn failure(rank: usize, what: &str, e: &CollectiveError) -> RunnerError {
    let detail = match e {
        CollectiveError::Global(g) => format!("with the other machines: {g:?}"),
        other => format!("{other:?}"),
    };
    RunnerError::Parallel(format!("worker {rank}: {what}: {detail}"))
}

/// A worker's index on its machine and among all workers.
#[derive(Clone, Copy)]
struct Place {
    rank: usize,
    global_rank: usize,
    world: usize,
}

/// The LoRA dropout seed of worker `global_rank` in a step whose seed is `step_seed`
/// ([`step_dropout_seed`]; a run without workers uses rank 0's).
pub(crate) fn worker_dropout_seed(step_seed: u64, global_rank: usize) -> u64 {
    SplitMix64::from_parts(&[step_seed, global_rank as u64]).next_u64()
}

/// The LoRA dropout seed of optimizer step `step` (from 0) of a run seeded `seed`: every step
/// draws its masks from a stream of its own, so a resumed run draws the uninterrupted run's.
pub(crate) fn step_dropout_seed(seed: u64, step: usize) -> u64 {
    // A tag keeps the stream apart from the run's other uses of its seed.
    const LORA_DROPOUT: u64 = 0x4C6F_5241_4472_6F70;
    SplitMix64::from_parts(&[seed, LORA_DROPOUT, step as u64]).next_u64()
}

fn worker<B: FusedAutodiffBackend, O: Objective<B>>(
    objective: &O,
    Place {
        rank,
        global_rank,
        world,
    }: Place,
    replica: &CausalLm<B>,
    share: &[&O::Batch],
    denominator: f64,
    device: &burn::tensor::Device<B>,
    stop: bool,
) -> Result<StepOutcome> {
    let peer = PeerId::from(rank);
    let fail = |what: &str, e: &CollectiveError| {
        // Wake the other workers, which would otherwise wait for this one forever.
        collective::reset_collective::<B::InnerBackend>();
        failure(rank, what, e)
    };
    let Contribution {
        loss,
        metrics,
        mut grads,
    } = objective.gradients(replica, share, denominator, device);
    // One all-reduce per step: every trained parameter's gradient, flattened in the module's
    // visiting order (the same on every worker and machine, unlike parameter ids; zeros for a
    // worker without a micro-batch of its own), then every worker's loss in its own slots (an
    // f32 pair that carries the f64) and the stop requests. A slot with one non-zero term sums
    // exactly.
    let mut flatten = Flatten::<B> {
        grads: &mut grads,
        parts: Vec::new(),
    };
    replica.visit(&mut flatten);
    // The objective's metrics follow, summed over the workers in f32 (they are for display).
    let mut slots = vec![0f32; 2 * world + 1 + metrics.len()];
    let hi = loss as f32;
    slots[global_rank] = hi;
    slots[world + global_rank] = (loss - f64::from(hi)) as f32;
    slots[2 * world] = f32::from(u8::from(stop));
    for (slot, m) in slots[2 * world + 1..].iter_mut().zip(&metrics) {
        *slot = *m as f32;
    }
    let mut parts = flatten.parts;
    let grad_len: usize = parts.iter().map(|t| t.dims()[0]).sum();
    let n_slots = slots.len();
    parts.push(Tensor::from_data(TensorData::new(slots, [n_slots]), device));
    let flat = Tensor::<B::InnerBackend, 1>::cat(parts, 0);
    let summed = collective::all_reduce::<B::InnerBackend>(
        peer,
        flat.into_primitive().tensor(),
        ReduceOperation::Sum,
    )
    .map_err(|e| fail("all-reduce", &e))?;
    let summed = Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(summed));
    let total = summed.dims()[0];
    let scalars: Vec<f32> = summed
        .clone()
        .slice(grad_len..total)
        .into_data()
        .to_vec()
        .map_err(|e| RunnerError::Parallel(format!("worker {rank}: reading the loss: {e:?}")))?;
    let mut unflatten = Unflatten::<B> {
        grads: &mut grads,
        flat: summed,
        offset: 0,
    };
    replica.visit(&mut unflatten);
    let loss = (0..world)
        .map(|r| f64::from(scalars[r]) + f64::from(scalars[world + r]))
        .sum();
    Ok(StepOutcome {
        loss,
        metrics: scalars[2 * world + 1..]
            .iter()
            .map(|&m| f64::from(m))
            .collect(),
        grads,
        stop: scalars[2 * world] > 0.5,
    })
}

/// Takes every trained parameter's gradient out of `grads`, flattened, in visiting order; zeros
/// for a parameter without one.
struct Flatten<'a, B: FusedAutodiffBackend> {
    grads: &'a mut GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: FusedAutodiffBackend> ModuleVisitor<B> for Flatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let grad = self
            .grads
            .remove::<B::InnerBackend, D>(param.id)
            .unwrap_or_else(|| param.val().inner().zeros_like());
        let n = grad.shape().num_elements();
        self.parts.push(grad.reshape([n]));
    }
}

/// Puts the gradients [`Flatten`] took (summed) back into `grads`, in the same order.
struct Unflatten<'a, B: FusedAutodiffBackend> {
    grads: &'a mut GradientsParams,
    flat: Tensor<B::InnerBackend, 1>,
    offset: usize,
}

impl<B: FusedAutodiffBackend> ModuleVisitor<B> for Unflatten<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let dims: [usize; D] = param.val().dims();
        let n: usize = dims.iter().product();
        let grad = self
            .flat
            .clone()
            .slice(self.offset..self.offset + n)
            .reshape(dims);
        self.offset += n;
        self.grads.register::<B::InnerBackend, D>(param.id, grad);
    }
}
