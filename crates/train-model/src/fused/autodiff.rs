//! The fused operations under autodiff: one graph node each, with a hand-written backward that
//! calls the inner backend's backward method.

use burn::backend::Autodiff;
use burn::backend::autodiff::{
    NodeId,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::ops::{FloatTensor, IntTensor};

use super::reference::{float, prim};
use super::{Activation, AttentionSpec, FusedBackend, SegmentIds};

type Inner<B> = FloatTensor<B>;

#[derive(Debug)]
struct AttentionBackward;

#[derive(Debug, Clone)]
struct AttentionState<B: FusedBackend> {
    q: Inner<B>,
    k: Inner<B>,
    v: Inner<B>,
    out: Inner<B>,
    lse: Inner<B>,
    segments: SegmentIds<B>,
    spec: AttentionSpec,
}

impl<B: FusedBackend> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) =
            B::fused_attention_backward(s.q, s.k, s.v, s.out, s.lse, grad, s.segments, &s.spec);
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

#[derive(Debug, Clone)]
struct RmsNormState<B: FusedBackend> {
    x: Inner<B>,
    weight: Inner<B>,
    rstd: Inner<B>,
    offset: f64,
}

impl<B: FusedBackend> Backward<B, 2> for RmsNormBackward {
    type State = RmsNormState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dx, dw) = B::fused_rms_norm_backward(s.x, s.weight, s.rstd, grad, s.offset);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_w {
            grads.register::<B>(node.id, dw);
        }
    }
}

/// The gated activation's node; it knows which activation it ran.
#[derive(Debug)]
struct GatedBackward(Activation);

impl<B: FusedBackend> Backward<B, 2> for GatedBackward {
    type State = (Inner<B>, Inner<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate, up) = ops.state;
        let (dg, du) = B::fused_gated_backward(gate, up, grad, self.0);
        if let Some(node) = node_g {
            grads.register::<B>(node.id, dg);
        }
        if let Some(node) = node_u {
            grads.register::<B>(node.id, du);
        }
    }
}

/// The backward of a projection `y = h · Wᵀ` whose node does not keep `h`: `d W = (hᵀ · dy)ᵀ`
/// (burn's matmul backward for `h · Wᵀ`, then its transpose's) registered for `weight_node`,
/// `h` recomputed by `h` only then; and `d h = dy · W` when `input` wants it.
fn linear_backward<B: FusedBackend>(
    grad: burn::tensor::Tensor<B, 2>,
    weight: Inner<B>,
    weight_node: Option<NodeId>,
    h: impl FnOnce() -> Inner<B>,
    input: bool,
    grads: &mut Gradients,
) -> Option<Inner<B>> {
    if let Some(id) = weight_node {
        let dw = float::<B, 2>(h())
            .transpose()
            .matmul(grad.clone())
            .transpose();
        grads.register::<B>(id, prim(dw));
    }
    input.then(|| prim(grad.matmul(float::<B, 2>(weight))))
}

/// The gated activation through a down projection: keeps `gate`, `up` and the weight, and
/// recomputes the activation in its backward.
#[derive(Debug)]
struct GatedLinearBackward(Activation);

impl<B: FusedBackend> Backward<B, 3> for GatedLinearBackward {
    type State = (Inner<B>, Inner<B>, Inner<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_g, node_u, node_w] = ops.parents;
        let grad = float::<B, 2>(grads.consume::<B>(&ops.node));
        let (gate, up, weight) = ops.state;
        let dh = linear_backward::<B>(
            grad,
            weight,
            node_w.as_ref().map(|n| n.id),
            || B::fused_gated(gate.clone(), up.clone(), self.0),
            node_g.is_some() || node_u.is_some(),
            grads,
        );
        if let Some(dh) = dh {
            let (dg, du) = B::fused_gated_backward(gate, up, dh, self.0);
            if let Some(node) = node_g {
                grads.register::<B>(node.id, dg);
            }
            if let Some(node) = node_u {
                grads.register::<B>(node.id, du);
            }
        }
    }
}

/// A norm's output through one projection: keeps the norm's input, weight and reciprocal rms
/// and the projection's weight, and recomputes the normalised input in its backward.
#[derive(Debug)]
struct RmsNormLinearBackward {
    eps: f64,
    offset: f64,
}

impl<B: FusedBackend> Backward<B, 3> for RmsNormLinearBackward {
    /// The norm's input, its weight, its reciprocal rms and the projection's weight.
    type State = (Inner<B>, Inner<B>, Inner<B>, Inner<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_norm, node_w] = ops.parents;
        let grad = float::<B, 2>(grads.consume::<B>(&ops.node));
        let (x, norm_weight, rstd, weight) = ops.state;
        // The projection's backward, then the norm's for this projection's share of `d h` (the
        // norm is linear in its gradient, so the shares' sum is the norm's gradient).
        let dh = linear_backward::<B>(
            grad,
            weight,
            node_w.as_ref().map(|n| n.id),
            || B::fused_rms_norm(x.clone(), norm_weight.clone(), self.eps, self.offset).0,
            node_x.is_some() || node_norm.is_some(),
            grads,
        );
        if let Some(dh) = dh {
            let (dx, dn) = B::fused_rms_norm_backward(x, norm_weight, rstd, dh, self.offset);
            if let Some(node) = node_x {
                grads.register::<B>(node.id, dx);
            }
            if let Some(node) = node_norm {
                grads.register::<B>(node.id, dn);
            }
        }
    }
}

#[derive(Debug)]
struct RotaryBackward;

impl<B: FusedBackend> Backward<B, 1> for RotaryBackward {
    type State = (Inner<B>, Inner<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::fused_rotary_backward(cos, sin, grad));
        }
    }
}

#[derive(Debug)]
struct EmbeddingBackward;

impl<B: FusedBackend> Backward<B, 1> for EmbeddingBackward {
    /// The ids, the table's length and the padding id.
    type State = (IntTensor<B>, usize, Option<i64>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_table] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (ids, vocab, padding) = ops.state;
        if let Some(node) = node_table {
            grads.register::<B>(
                node.id,
                B::fused_embedding_backward(grad, ids, vocab, padding),
            );
        }
    }
}

impl<B: FusedBackend, C: CheckpointStrategy> FusedBackend for Autodiff<B, C> {
    fn padding_free_attention(device: &Self::Device, dtype: burn::tensor::DType) -> bool {
        B::padding_free_attention(device, dtype)
    }

    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        segments: SegmentIds<Self>,
        spec: &AttentionSpec,
    ) -> FloatTensor<Self> {
        match AttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::fused_attention_lse(
                    q.primitive.clone(),
                    k.primitive.clone(),
                    v.primitive.clone(),
                    segments.clone(),
                    spec,
                );
                let state = AttentionState::<B> {
                    q: q.primitive,
                    k: k.primitive,
                    v: v.primitive,
                    out: out.clone(),
                    lse,
                    segments,
                    spec: *spec,
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fused_attention(
                q.primitive,
                k.primitive,
                v.primitive,
                segments,
                spec,
            )),
        }
    }

    fn fused_rms_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
        offset: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (y, rstd) =
            B::fused_rms_norm(x.primitive.clone(), weight.primitive.clone(), eps, offset);
        let out = match RmsNormBackward
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                RmsNormState::<B> {
                    x: x.primitive,
                    weight: weight.primitive,
                    rstd: rstd.clone(),
                    offset,
                },
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (
            out,
            <Self as burn::tensor::backend::AutodiffBackend>::from_inner(rstd),
        )
    }

    fn fused_gated(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        act: Activation,
    ) -> FloatTensor<Self> {
        let y = B::fused_gated(gate.primitive.clone(), up.primitive.clone(), act);
        match GatedBackward(act)
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((gate.primitive, up.primitive), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_gated_linear(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        act: Activation,
    ) -> FloatTensor<Self> {
        let y = B::fused_gated_linear(
            gate.primitive.clone(),
            up.primitive.clone(),
            weight.primitive.clone(),
            act,
        );
        match GatedLinearBackward(act)
            .prepare::<C>([gate.node.clone(), up.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((gate.primitive, up.primitive, weight.primitive), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_rms_norm_linears<const N: usize>(
        x: FloatTensor<Self>,
        norm_weight: FloatTensor<Self>,
        weights: [FloatTensor<Self>; N],
        eps: f64,
        offset: f64,
    ) -> [FloatTensor<Self>; N] {
        let (normed, rstd) = B::fused_rms_norm(
            x.primitive.clone(),
            norm_weight.primitive.clone(),
            eps,
            offset,
        );
        let h = float::<B, 2>(normed);
        weights.map(|w| {
            let y = prim(crate::model::project(
                h.clone(),
                float::<B, 2>(w.primitive.clone()),
                None,
            ));
            match (RmsNormLinearBackward { eps, offset })
                .prepare::<C>([x.node.clone(), norm_weight.node.clone(), w.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    (
                        x.primitive.clone(),
                        norm_weight.primitive.clone(),
                        rstd.clone(),
                        w.primitive,
                    ),
                    y,
                ),
                OpsKind::UnTracked(prep) => prep.finish(y),
            }
        })
    }

    fn fused_embedding(
        table: FloatTensor<Self>,
        ids: IntTensor<Self>,
        padding: Option<i64>,
    ) -> FloatTensor<Self> {
        use burn::tensor::TensorMetadata;
        let vocab = table.primitive.shape()[0];
        let y = B::fused_embedding(table.primitive.clone(), ids.clone(), padding);
        match EmbeddingBackward
            .prepare::<C>([table.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((ids, vocab, padding), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let y = B::fused_rotary(
            x.primitive.clone(),
            cos.primitive.clone(),
            sin.primitive.clone(),
        );
        match RotaryBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((cos.primitive, sin.primitive), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}
