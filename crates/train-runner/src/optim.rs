//! AdamW exactly as `torch.optim.AdamW` computes it, with `transformers.Trainer`'s parameter
//! groups (no weight decay on biases and norm weights), global gradient-norm clipping, and a
//! state keyed by Hugging Face parameter names (so a checkpoint does not depend on burn's
//! per-process parameter ids).

use std::collections::HashMap;
use std::path::Path;

use burn::module::{ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, FloatDType, Tensor, TensorData, TensorPrimitive};
use train_model::{AdamWStep, FusedAutodiffBackend, FusedBackend};
use train_model::{CausalLm, NamedParam, ParamKind, tensor_specs};
use train_model::{LazyTensor, StorageDtype, write_safetensors};

use crate::error::{Result, RunnerError};

/// AdamW hyper-parameters (PyTorch's defaults but for the learning rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub epsilon: f64,
    /// Decoupled weight decay, applied to matrices only.
    pub weight_decay: f64,
}

struct Moments<B: Backend> {
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
}

/// Name, kind and id of every parameter of a model.
#[derive(Debug, Clone)]
pub struct ParamTable {
    by_id: HashMap<ParamId, (String, ParamKind)>,
}

impl ParamTable {
    /// Reads the names of `model`'s parameters.
    pub fn new<B: Backend>(model: &CausalLm<B>) -> Self {
        let kinds: HashMap<String, ParamKind> = tensor_specs(&model.config)
            .into_iter()
            .map(|s| (s.name, s.kind))
            .collect();
        let mut by_id = HashMap::new();
        model.visit_named(|p| {
            let (name, id) = match p {
                NamedParam::Vector(n, t) => (n, t.id),
                NamedParam::Matrix(n, t) => (n, t.id),
            };
            let kind = kinds.get(name).copied().unwrap_or(ParamKind::Matrix);
            by_id.insert(id, (name.to_string(), kind));
        });
        // LoRA weights are matrices (decayed, as `transformers.Trainer` decays them).
        model.visit_adapters(|name, p| {
            by_id.insert(p.id, (name.to_string(), ParamKind::Matrix));
        });
        Self { by_id }
    }
}

/// The optimizer.
pub struct AdamW<B: FusedAutodiffBackend> {
    config: AdamWConfig,
    step: u64,
    state: HashMap<String, Moments<B::InnerBackend>>,
}

impl<B: FusedAutodiffBackend> std::fmt::Debug for AdamW<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

/// The global L2 norm of every gradient: each gradient's sum of squares in f32 on the device
/// ([`FusedBackend::fused_sum_squares`], no squared copy where the backend has its own), summed.
pub fn global_grad_norm<B: FusedAutodiffBackend>(
    model: &CausalLm<B>,
    grads: &GradientsParams,
) -> f64 {
    let mut acc: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut add = |g: TensorPrimitive<B::InnerBackend>| {
        let s = Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(
            B::InnerBackend::fused_sum_squares(g.tensor()),
        ));
        acc = Some(match acc.take() {
            Some(a) => a + s,
            None => s,
        });
    };
    model.visit_named(|p| match p {
        NamedParam::Vector(_, t) => {
            if let Some(g) = grads.get::<B::InnerBackend, 1>(t.id) {
                add(g.into_primitive());
            }
        }
        NamedParam::Matrix(_, t) => {
            if let Some(g) = grads.get::<B::InnerBackend, 2>(t.id) {
                add(g.into_primitive());
            }
        }
    });
    model.visit_adapters(|_, t| {
        if let Some(g) = grads.get::<B::InnerBackend, 2>(t.id) {
            add(g.into_primitive());
        }
    });
    acc.map_or(0.0, |a| f64::from(a.into_scalar().elem::<f32>()).sqrt())
}

impl<B: FusedAutodiffBackend> AdamW<B> {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            state: HashMap::new(),
        }
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient; gradients are multiplied by
    /// `grad_scale` first (the clipping coefficient).
    pub fn step(
        &mut self,
        model: CausalLm<B>,
        table: &ParamTable,
        grads: GradientsParams,
        lr: f64,
        grad_scale: f64,
    ) -> CausalLm<B> {
        self.step += 1;
        let mut mapper = Mapper {
            optim: self,
            table,
            grads,
            lr,
            grad_scale,
        };
        burn::module::Module::map(model, &mut mapper)
    }

    /// Writes the moments (`exp_avg.<name>`, `exp_avg_sq.<name>`) and the step count.
    pub fn save(&self, path: &Path) -> Result<()> {
        // Each moment is read back only when the file reaches it (no host copy of the whole
        // state, which is twice the model's size).
        let mut names: Vec<&String> = self.state.keys().collect();
        names.sort();
        let mut tensors = Vec::with_capacity(2 * names.len());
        for name in names {
            let m = &self.state[name];
            for (prefix, t) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
                tensors.push(LazyTensor::from_tensor(
                    format!("{prefix}.{name}"),
                    t.clone(),
                    StorageDtype::F32,
                ));
            }
        }
        let metadata = [
            ("format".to_string(), "train-rs-adamw".to_string()),
            ("step".to_string(), self.step.to_string()),
        ]
        .into();
        write_safetensors(&tensors, metadata, path).map_err(|e| RunnerError::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Restores what [`AdamW::save`] wrote.
    pub fn load(
        &mut self,
        path: &Path,
        device: &burn::tensor::Device<B::InnerBackend>,
    ) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| RunnerError::io(path, e))?;
        let bad = |message: String| RunnerError::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let (_, metadata) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let step = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("no step count in the optimizer state".into()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut state = HashMap::new();
        for (name, view) in st.tensors() {
            let Some(param) = name.strip_prefix("exp_avg.") else {
                continue;
            };
            let sq = st
                .tensor(&format!("exp_avg_sq.{param}"))
                .map_err(|_| bad(format!("exp_avg_sq.{param} is missing")))?;
            let load =
                |v: &safetensors::tensor::TensorView<'_>| -> Result<Tensor<B::InnerBackend, 1>> {
                    if v.dtype() != safetensors::Dtype::F32 || v.shape().len() != 1 {
                        return Err(bad(format!("{name}: expected a flat f32 tensor")));
                    }
                    let data = TensorData::from_bytes_vec(
                        v.data().to_vec(),
                        v.shape().to_vec(),
                        burn::tensor::DType::F32,
                    );
                    Ok(Tensor::from_data(data, (device, burn::tensor::DType::F32)))
                };
            state.insert(
                param.to_string(),
                Moments {
                    exp_avg: load(&view)?,
                    exp_avg_sq: load(&sq)?,
                },
            );
        }
        self.step = step;
        self.state = state;
        Ok(())
    }
}

struct Mapper<'a, B: FusedAutodiffBackend> {
    optim: &'a mut AdamW<B>,
    table: &'a ParamTable,
    grads: GradientsParams,
    lr: f64,
    grad_scale: f64,
}

impl<B: FusedAutodiffBackend> ModuleMapper<B> for Mapper<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let (Some(grad), Some((name, kind))) = (
            self.grads.remove::<B::InnerBackend, D>(id),
            self.table.by_id.get(&id),
        ) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let c = self.optim.config;
        let shape = tensor.shape();
        let n = shape.num_elements();
        let dtype = tensor.dtype();
        let require_grad = tensor.is_require_grad();
        let p = tensor.inner().cast(FloatDType::F32).reshape([n]);
        // The gradient in its own shape: a projection's weight gradient is a transposed view,
        // which `fused_adamw` may read in place (flattening it here would copy it).
        let g = grad.cast(FloatDType::F32);
        let moments = self.optim.state.remove(name).unwrap_or_else(|| Moments {
            exp_avg: p.zeros_like(),
            exp_avg_sq: p.zeros_like(),
        });
        // torch.optim.AdamW (single tensor path), step by step, in one fused operation.
        let step = AdamWStep {
            lr: self.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            epsilon: c.epsilon,
            weight_decay: if *kind == ParamKind::Matrix {
                c.weight_decay
            } else {
                0.0
            },
            step: self.optim.step,
            grad_scale: self.grad_scale,
        };
        let prim = |t: Tensor<B::InnerBackend, 1>| t.into_primitive().tensor();
        let float = |t| Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(t));
        let (p, exp_avg, exp_avg_sq) = <B::InnerBackend as FusedBackend>::fused_adamw(
            prim(p),
            g.into_primitive().tensor(),
            prim(moments.exp_avg),
            prim(moments.exp_avg_sq),
            &step,
        );
        let p = float(p);
        self.optim.state.insert(
            name.clone(),
            Moments {
                exp_avg: float(exp_avg),
                exp_avg_sq: float(exp_avg_sq),
            },
        );
        let mut updated = Tensor::<B, D>::from_inner(p.reshape(shape).cast(dtype));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// The decoder layer a parameter name belongs to (`model.layers.<l>.…`).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
}

/// The L2 norm of every transformer layer's parameters (`model.layers.N.*`), in layer order,
/// computed on the device: one small transfer, no host copy of the weights.
pub fn layer_norms<B: Backend>(model: &CausalLm<B>) -> Vec<f64> {
    let n = model.layers.len();
    let mut squares: Vec<Vec<Tensor<B, 1>>> = (0..n).map(|_| Vec::new()).collect();
    model.visit_named(|p| {
        let name = match &p {
            NamedParam::Matrix(name, _) | NamedParam::Vector(name, _) => *name,
        };
        // Only layers' parameters: the embedding's squares (a temporary as large as the
        // table) would be computed for nothing.
        let Some(l) = layer_of(name).filter(|&l| l < n) else {
            return;
        };
        squares[l].push(match p {
            NamedParam::Matrix(_, w) => w.val().cast(FloatDType::F32).powi_scalar(2).sum(),
            NamedParam::Vector(_, v) => v.val().cast(FloatDType::F32).powi_scalar(2).sum(),
        });
    });
    model.visit_adapters(|name, w| {
        let layer = layer_of(name);
        if let Some(l) = layer.filter(|&l| l < n) {
            squares[l].push(w.val().cast(FloatDType::F32).powi_scalar(2).sum());
        }
    });
    let sums: Vec<Tensor<B, 1>> = squares
        .into_iter()
        .filter(|v| !v.is_empty())
        .map(|v| Tensor::cat(v, 0).sum())
        .collect();
    if sums.is_empty() {
        return Vec::new();
    }
    Tensor::cat(sums, 0)
        .into_data()
        .to_vec::<f32>()
        .map(|v| v.into_iter().map(|x| f64::from(x).sqrt()).collect())
        .unwrap_or_default()
}
