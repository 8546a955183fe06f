//! The fused operations (`train_model::{attention, rms_norm, gated, rotary}`) against the
//! decomposed reference, values and
//! gradients through autodiff: attention (causal, grouped heads, segments, cache offset,
//! sliding window, softcap; one block or many), RMSNorm (with the `1 + w` variant), SwiGLU,
//! GeGLU and rotary, AdamW, the softmax cross-entropy, the embedding's gradient and the sum of
//! squares against their reference bodies — on every
//! backend compiled in. Property tests vary the shapes.

use burn::backend::Autodiff;
use burn::tensor::activation::{gelu_approximate, silu, softmax};
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use proptest::prelude::*;
use train_model::apply_rotary;
use train_model::repeat_kv;
use train_model::{Activation, FusedBackend};
use train_model::{AttentionSpec, reference};

thread_local! {
    /// Draws made by this test's thread: each draw is a stream of its own.
    static DRAWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Uniform numbers in [0, 1) from a SplitMix64 stream of its own (the n-th draw of the test's
/// thread), so that a test sees the same data on every run, whatever runs beside it (burn's
/// `Tensor::random` shares one generator between the tests of the process).
fn unit_stream(n: usize) -> Vec<f64> {
    let stream = DRAWS.with(|c| {
        let v = c.get();
        c.set(v + 1);
        v
    });
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ stream.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

/// Seeded normal samples (Box-Muller over [`unit_stream`]).
fn normal<B: burn::tensor::backend::Backend, const D: usize>(
    shape: [usize; D],
    mean: f64,
    std: f64,
    device: &B::Device,
) -> Tensor<B, D> {
    let n: usize = shape.iter().product();
    let u = unit_stream(2 * n);
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let r = (-2.0 * (1.0 - u[2 * i]).ln()).sqrt();
            (mean + std * r * (std::f64::consts::TAU * u[2 * i + 1]).cos()) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Seeded uniform samples in [lo, hi).
fn uniform<B: burn::tensor::backend::Backend, const D: usize>(
    shape: [usize; D],
    lo: f64,
    hi: f64,
    device: &B::Device,
) -> Tensor<B, D> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = unit_stream(n)
        .into_iter()
        .map(|u| (lo + (hi - lo) * u) as f32)
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Largest |a − b| over max(1, largest |b|): relative to the tensor's scale.
fn rel_diff<B: burn::tensor::backend::Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> f32 {
    let a: Vec<f32> = a.into_data().convert::<f32>().to_vec().unwrap();
    let b: Vec<f32> = b.into_data().convert::<f32>().to_vec().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst.is_finite(), "non-finite difference");
    worst / scale
}

/// One attention problem.
#[derive(Debug, Clone)]
struct Case {
    b: usize,
    h: usize,
    kvh: usize,
    sq: usize,
    past: usize,
    d: usize,
    window: Option<usize>,
    softcap: Option<f64>,
    /// Segment lengths of each batch row over all `past + sq` positions (packed rows).
    segments: Option<Vec<Vec<usize>>>,
}

impl Case {
    fn sk(&self) -> usize {
        self.past + self.sq
    }

    fn spec(&self) -> AttentionSpec {
        AttentionSpec {
            past: self.past,
            window: self.window,
            softcap: self.softcap,
            ..AttentionSpec::causal(self.d)
        }
    }

    /// Segment id of each position of each row.
    fn segment_ids(&self) -> Option<Vec<Vec<i64>>> {
        self.segments.as_ref().map(|rows| {
            rows.iter()
                .map(|lens| {
                    let mut ids = Vec::new();
                    for (i, &n) in lens.iter().enumerate() {
                        ids.extend(std::iter::repeat_n(i as i64, n));
                    }
                    ids.resize(self.sk(), lens.len() as i64);
                    ids
                })
                .collect()
        })
    }

    /// `[b, 1, sq, sk]` additive mask built on the host, pair by pair.
    fn bias<B: burn::tensor::backend::Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        let seg = self.segment_ids();
        let (sq, sk) = (self.sq, self.sk());
        let mut v = Vec::with_capacity(self.b * sq * sk);
        for r in 0..self.b {
            for i in 0..sq {
                let qi = self.past + i;
                for j in 0..sk {
                    let mut ok = j <= qi;
                    if let Some(w) = self.window {
                        ok &= qi - j.min(qi) < w;
                    }
                    if let Some(s) = &seg {
                        ok &= s[r][qi] == s[r][j];
                    }
                    v.push(if ok { 0.0f32 } else { f32::MIN });
                }
            }
        }
        Tensor::from_data(TensorData::new(v, [self.b, 1, sq, sk]), device)
    }
}

/// The decomposed attention (`transformers` eager with repeated heads and a full mask).
fn decomposed<B: burn::tensor::backend::Backend>(
    c: &Case,
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let n = c.h / c.kvh;
    let k = repeat_kv(k, n);
    let v = repeat_kv(v, n);
    let mut s = q.matmul(k.transpose()) * c.spec().scale;
    if let Some(cap) = c.softcap {
        s = s.div_scalar(cap).tanh().mul_scalar(cap);
    }
    let s = s + c.bias::<B>(&v.device());
    softmax(s, 3).matmul(v)
}

fn int2<B: burn::tensor::backend::Backend>(
    rows: &[Vec<i64>],
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let n = rows[0].len();
    Tensor::from_data(TensorData::new(rows.concat(), [rows.len(), n]), device)
}

fn check_attention<B: FusedBackend>(c: &Case, device: &B::Device) {
    type Ad<B> = Autodiff<B>;
    let rnd = |shape: [usize; 4]| normal::<B, 4>(shape, 0.0, 1.0, device);
    let q = rnd([c.b, c.h, c.sq, c.d]);
    let k = rnd([c.b, c.kvh, c.sk(), c.d]);
    let v = rnd([c.b, c.kvh, c.sk(), c.d]);
    let dout = rnd([c.b, c.h, c.sq, c.d]);
    let leaf = |t: &Tensor<B, 4>| Tensor::<Ad<B>, 4>::from_inner(t.clone()).require_grad();

    // Decomposed, through autodiff.
    let (q1, k1, v1) = (leaf(&q), leaf(&k), leaf(&v));
    let o1 = decomposed(c, q1.clone(), k1.clone(), v1.clone());
    let g1 = (o1.clone() * Tensor::from_inner(dout.clone()))
        .sum()
        .backward();

    // Fused, through autodiff (its own backward).
    let (q2, k2, v2) = (leaf(&q), leaf(&k), leaf(&v));
    let seg = c.segment_ids().map(|ids| {
        let q_ids: Vec<Vec<i64>> = ids.iter().map(|r| r[c.past..].to_vec()).collect();
        (int2::<Ad<B>>(&q_ids, device), int2::<Ad<B>>(&ids, device))
    });
    let o2 = train_model::attention(q2.clone(), k2.clone(), v2.clone(), seg, &c.spec());
    let g2 = (o2.clone() * Tensor::from_inner(dout.clone()))
        .sum()
        .backward();

    let tol = 1e-5;
    let out = rel_diff(o2.inner(), o1.clone().inner());
    let dq = rel_diff(q2.grad(&g2).unwrap(), q1.grad(&g1).unwrap());
    let dk = rel_diff(k2.grad(&g2).unwrap(), k1.grad(&g1).unwrap());
    let dv = rel_diff(v2.grad(&g2).unwrap(), v1.grad(&g1).unwrap());
    assert!(
        out <= tol && dq <= tol && dk <= tol && dv <= tol,
        "{c:?}: out {out:.2e} dq {dq:.2e} dk {dk:.2e} dv {dv:.2e}"
    );

    // Every block size gives the same forward and backward.
    let spec = c.spec();
    let prim = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
    let seg_inner = c.segment_ids().map(|ids| {
        let q_ids: Vec<Vec<i64>> = ids.iter().map(|r| r[c.past..].to_vec()).collect();
        (
            int2::<B>(&q_ids, device).into_primitive(),
            int2::<B>(&ids, device).into_primitive(),
        )
    });
    let float = |p| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(p));
    for rows in [1, 3, c.sq] {
        let (o, lse) = reference::attention_forward_in_blocks::<B>(
            prim(&q),
            prim(&k),
            prim(&v),
            seg_inner.clone(),
            &spec,
            rows,
        );
        let (dq, dk, dv) = reference::attention_backward_in_blocks::<B>(
            prim(&q),
            prim(&k),
            prim(&v),
            o.clone(),
            lse,
            prim(&dout),
            seg_inner.clone(),
            &spec,
            rows,
        );
        let e = [
            rel_diff(float(o), o1.clone().inner()),
            rel_diff(float(dq), q1.grad(&g1).unwrap()),
            rel_diff(float(dk), k1.grad(&g1).unwrap()),
            rel_diff(float(dv), v1.grad(&g1).unwrap()),
        ];
        assert!(
            e.iter().all(|x| *x <= tol),
            "{c:?}, {rows} rows per block: {e:?}"
        );
    }
}

fn base(b: usize, h: usize, kvh: usize, sq: usize, d: usize) -> Case {
    Case {
        b,
        h,
        kvh,
        sq,
        past: 0,
        d,
        window: None,
        softcap: None,
        segments: None,
    }
}

/// The cases the issue names: odd lengths, one token, GQA ratios, segments of length 1, a
/// window larger than the sequence, softcap, a cache offset, and several blocks.
fn named_cases() -> Vec<Case> {
    vec![
        base(2, 4, 2, 7, 8),
        base(1, 1, 1, 1, 4),
        base(1, 6, 1, 5, 4),
        base(1, 8, 8, 3, 16),
        Case {
            segments: Some(vec![vec![1, 3, 1, 2], vec![7]]),
            ..base(2, 4, 2, 7, 8)
        },
        Case {
            segments: Some(vec![vec![1; 6]]),
            ..base(1, 2, 1, 6, 4)
        },
        Case {
            window: Some(3),
            ..base(1, 4, 2, 9, 8)
        },
        Case {
            window: Some(100),
            ..base(1, 4, 2, 9, 8)
        },
        Case {
            softcap: Some(2.0),
            ..base(2, 4, 2, 6, 8)
        },
        Case {
            past: 5,
            ..base(2, 4, 2, 3, 8)
        },
        Case {
            past: 4,
            segments: Some(vec![vec![2, 5], vec![6, 1]]),
            ..base(2, 4, 2, 3, 8)
        },
        Case {
            past: 3,
            sq: 1,
            window: Some(2),
            ..base(1, 2, 1, 1, 4)
        },
        // More query rows than one default block (128): causal skipping across blocks.
        base(1, 2, 1, 300, 8),
        // Segments longer than a block and across block boundaries (a padding-free row).
        Case {
            segments: Some(vec![vec![150, 1, 99, 50]]),
            ..base(1, 2, 1, 300, 8)
        },
    ]
}

fn check_norm_gate_rotary<B: FusedBackend>(device: &B::Device) {
    type Ad<B> = Autodiff<B>;
    let tol = 1e-5;
    for (rows, n) in [(1, 1), (5, 7), (33, 64), (1100, 64)] {
        let x = normal::<B, 2>([rows, n], 0.0, 2.0, device);
        let w = normal::<B, 1>([n], 1.0, 0.5, device);
        let dy = normal::<B, 2>([rows, n], 0.0, 1.0, device);
        for offset in [0.0, 1.0] {
            let (x1, w1) = (
                Tensor::<Ad<B>, 2>::from_inner(x.clone()).require_grad(),
                Tensor::<Ad<B>, 1>::from_inner(w.clone()).require_grad(),
            );
            // `transformers`' RmsNorm from elementary operations, scale `w + offset`.
            let rstd = (x1.clone().square().mean_dim(1) + 1e-6).sqrt().recip();
            let y1 = x1.clone() * rstd * w1.clone().add_scalar(offset).reshape([1, n]);
            let g1 = (y1.clone() * Tensor::from_inner(dy.clone()))
                .sum()
                .backward();
            let (x2, w2) = (
                Tensor::<Ad<B>, 2>::from_inner(x.clone()).require_grad(),
                Tensor::<Ad<B>, 1>::from_inner(w.clone()).require_grad(),
            );
            let y2 = train_model::rms_norm(x2.clone(), w2.clone(), 1e-6, offset);
            let g2 = (y2.clone() * Tensor::from_inner(dy.clone()))
                .sum()
                .backward();
            let e = [
                rel_diff(y2.inner(), y1.inner()),
                rel_diff(x2.grad(&g2).unwrap(), x1.grad(&g1).unwrap()),
                rel_diff(w2.grad(&g2).unwrap(), w1.grad(&g1).unwrap()),
            ];
            assert!(
                e.iter().all(|v| *v <= tol),
                "rms norm {rows}x{n} +{offset}: {e:?}"
            );
        }

        let u = normal::<B, 2>([rows, n], 0.0, 1.0, device);
        let leaf = |t: &Tensor<B, 2>| Tensor::<Ad<B>, 2>::from_inner(t.clone()).require_grad();
        // SwiGLU, and GeGLU (Gemma: GELU with the tanh approximation), against burn's own.
        type Decomposed<B> = fn(Tensor<Ad<B>, 2>) -> Tensor<Ad<B>, 2>;
        let gates: [(Activation, Decomposed<B>); 2] = [
            (Activation::Silu, silu),
            (Activation::GeluTanh, gelu_approximate),
        ];
        for (act, decomposed) in gates {
            let (a1, b1, a2, b2) = (leaf(&x), leaf(&u), leaf(&x), leaf(&u));
            let y1 = decomposed(a1.clone()) * b1.clone();
            let g1 = (y1.clone() * Tensor::from_inner(dy.clone()))
                .sum()
                .backward();
            let y2 = train_model::gated(a2.clone(), b2.clone(), act);
            let g2 = (y2.clone() * Tensor::from_inner(dy.clone()))
                .sum()
                .backward();
            let e = [
                rel_diff(y2.inner(), y1.inner()),
                rel_diff(a2.grad(&g2).unwrap(), a1.grad(&g1).unwrap()),
                rel_diff(b2.grad(&g2).unwrap(), b1.grad(&g1).unwrap()),
            ];
            assert!(e.iter().all(|v| *v <= tol), "{act:?} {rows}x{n}: {e:?}");
        }
    }

    for (b, h, s, d) in [(1, 1, 1, 2), (2, 3, 5, 8), (2, 3, 700, 64)] {
        let x = normal::<B, 4>([b, h, s, d], 0.0, 1.0, device);
        let ang = uniform::<B, 4>([b, 1, s, d], -3.0, 3.0, device);
        let (cos, sin) = (ang.clone().cos(), ang.sin());
        let dy = normal::<B, 4>([b, h, s, d], 0.0, 1.0, device);
        let (c, sn) = (
            Tensor::<Ad<B>, 4>::from_inner(cos),
            Tensor::<Ad<B>, 4>::from_inner(sin),
        );
        let x1 = Tensor::<Ad<B>, 4>::from_inner(x.clone()).require_grad();
        let y1 = apply_rotary(x1.clone(), &c, &sn);
        let g1 = (y1.clone() * Tensor::from_inner(dy.clone()))
            .sum()
            .backward();
        let x2 = Tensor::<Ad<B>, 4>::from_inner(x).require_grad();
        let y2 = train_model::rotary(x2.clone(), &c, &sn);
        let g2 = (y2.clone() * Tensor::from_inner(dy)).sum().backward();
        let e = [
            rel_diff(y2.inner(), y1.inner()),
            rel_diff(x2.grad(&g2).unwrap(), x1.grad(&g1).unwrap()),
        ];
        assert!(e.iter().all(|v| *v <= tol), "rotary {b}x{h}x{s}x{d}: {e:?}");
    }
}

/// The gated activation through a down projection (one node that recomputes the activation in
/// its backward) against the gate followed by a plain matmul: values and the gradients of
/// gate, up and weight, with the weight trained and frozen, a few rows (the decoding layout)
/// and many.
fn check_gated_linear<B: FusedBackend>(device: &B::Device) {
    type Ad<B> = Autodiff<B>;
    let tol = 1e-5;
    for (rows, n, out) in [(1, 1, 1), (3, 7, 5), (40, 64, 24), (700, 96, 48)] {
        let g = normal::<B, 3>([1, rows, n], 0.0, 2.0, device);
        let u = normal::<B, 3>([1, rows, n], 0.0, 1.0, device);
        let w = normal::<B, 2>([out, n], 0.0, 0.3, device);
        let dy = normal::<B, 3>([1, rows, out], 0.0, 1.0, device);
        for act in [Activation::Silu, Activation::GeluTanh] {
            for trained in [true, false] {
                let leaf3 =
                    |t: &Tensor<B, 3>| Tensor::<Ad<B>, 3>::from_inner(t.clone()).require_grad();
                let weight = || {
                    let t = Tensor::<Ad<B>, 2>::from_inner(w.clone());
                    if trained { t.require_grad() } else { t }
                };
                let (g1, u1, w1) = (leaf3(&g), leaf3(&u), weight());
                let h = train_model::gated(g1.clone(), u1.clone(), act).reshape([rows, n]);
                let y1 = h.matmul(w1.clone().transpose()).reshape([1, rows, out]);
                let gr1 = (y1.clone() * Tensor::from_inner(dy.clone()))
                    .sum()
                    .backward();
                let (g2, u2, w2) = (leaf3(&g), leaf3(&u), weight());
                let y2 = train_model::gated_linear(g2.clone(), u2.clone(), w2.clone(), act);
                let gr2 = (y2.clone() * Tensor::from_inner(dy.clone()))
                    .sum()
                    .backward();
                let mut e = vec![
                    rel_diff(y2.inner(), y1.inner()),
                    rel_diff(g2.grad(&gr2).unwrap(), g1.grad(&gr1).unwrap()),
                    rel_diff(u2.grad(&gr2).unwrap(), u1.grad(&gr1).unwrap()),
                ];
                match (w2.grad(&gr2), w1.grad(&gr1)) {
                    (Some(a), Some(b)) => e.push(rel_diff(a, b)),
                    (None, None) => assert!(!trained, "no weight gradient"),
                    (a, b) => panic!("weight gradient {:?} vs {:?}", a.is_some(), b.is_some()),
                }
                assert!(
                    e.iter().all(|v| *v <= tol),
                    "{act:?} {rows}x{n}x{out} trained {trained}: {e:?}"
                );
            }
        }
    }
}

/// A norm through several projections without keeping the norm's output
/// (`rms_norm_linears`) against the fused norm and a matmul per projection: values and every
/// gradient (the input's, the norm weight's, each projection's), the weights trained and
/// frozen, Llama's and Gemma's `(1 + w)` scale, one row (decoding) to several hundred.
fn check_rms_norm_linears<B: FusedBackend>(device: &B::Device) {
    check_rms_norm_linears_n::<B, 1>(1, 1, [1], device);
    check_rms_norm_linears_n::<B, 1>(40, 64, [24], device);
    check_rms_norm_linears_n::<B, 2>(3, 7, [5, 2], device);
    check_rms_norm_linears_n::<B, 2>(700, 96, [48, 16], device);
    check_rms_norm_linears_n::<B, 3>(1, 5, [5, 2, 2], device);
    check_rms_norm_linears_n::<B, 3>(300, 64, [24, 8, 8], device);
}

fn check_rms_norm_linears_n<B: FusedBackend, const N: usize>(
    rows: usize,
    n: usize,
    outs: [usize; N],
    device: &B::Device,
) {
    type Ad<B> = Autodiff<B>;
    let tol = 1e-5;
    let x = normal::<B, 3>([1, rows, n], 0.5, 2.0, device);
    let nw = normal::<B, 1>([n], 1.0, 0.5, device);
    let ws = outs.map(|o| normal::<B, 2>([o, n], 0.0, 0.3, device));
    let dys = outs.map(|o| normal::<B, 3>([1, rows, o], 0.0, 1.0, device));
    for offset in [0.0, 1.0] {
        for trained in [true, false] {
            let leaf = |t: &Tensor<B, 2>| {
                let t = Tensor::<Ad<B>, 2>::from_inner(t.clone());
                if trained { t.require_grad() } else { t }
            };
            let norm_leaf = || {
                let t = Tensor::<Ad<B>, 1>::from_inner(nw.clone());
                if trained { t.require_grad() } else { t }
            };
            let input = || Tensor::<Ad<B>, 3>::from_inner(x.clone()).require_grad();
            let loss = |ys: &[Tensor<Ad<B>, 3>; N]| {
                ys.iter()
                    .zip(&dys)
                    .map(|(y, dy)| (y.clone() * Tensor::from_inner(dy.clone())).sum())
                    .reduce(|a, b| a + b)
                    .unwrap()
            };
            // The norm's output through a matmul per projection.
            let (x1, n1, w1) = (input(), norm_leaf(), ws.each_ref().map(leaf));
            let h = train_model::rms_norm(x1.clone(), n1.clone(), 1e-6, offset).reshape([rows, n]);
            let y1 = w1.each_ref().map(|w| {
                let o = w.dims()[0];
                h.clone()
                    .matmul(w.clone().transpose())
                    .reshape([1, rows, o])
            });
            let gr1 = loss(&y1).backward();
            let (x2, n2, w2) = (input(), norm_leaf(), ws.each_ref().map(leaf));
            let y2 =
                train_model::rms_norm_linears(x2.clone(), n2.clone(), w2.clone(), 1e-6, offset);
            let gr2 = loss(&y2).backward();
            let what = format!("{rows}x{n}x{outs:?} offset {offset} trained {trained}");
            let mut e = vec![rel_diff(x2.grad(&gr2).unwrap(), x1.grad(&gr1).unwrap())];
            for (a, b) in y2.iter().zip(&y1) {
                e.push(rel_diff(a.clone().inner(), b.clone().inner()));
            }
            let norm_grads = (
                n2.grad(&gr2).map(|g| g.reshape([1, n])),
                n1.grad(&gr1).map(|g| g.reshape([1, n])),
            );
            let weight_grads = w2
                .iter()
                .zip(&w1)
                .map(|(a, b)| (a.grad(&gr2), b.grad(&gr1)));
            for pair in std::iter::once(norm_grads).chain(weight_grads) {
                match pair {
                    (Some(a), Some(b)) => e.push(rel_diff(a, b)),
                    (None, None) => assert!(!trained, "{what}: no weight gradient"),
                    (a, b) => panic!("{what}: gradient {:?} vs {:?}", a.is_some(), b.is_some()),
                }
            }
            assert!(e.iter().all(|v| *v <= tol), "{what}: {e:?}");
        }
    }
}

/// `acc + lhs · rhs` (in place where the backend can) against the plain sum: a transposed
/// left operand and a right one narrowed from a larger buffer (as the chunked LM head passes
/// them), and an accumulator that another tensor shares, which must come out unchanged.
fn check_matmul_add<B: FusedBackend>(device: &B::Device) {
    use burn::tensor::TensorPrimitive;
    for (m, k, n) in [(1, 1, 1), (7, 3, 5), (300, 41, 64)] {
        let acc = normal::<B, 2>([m, n], 0.0, 1.0, device);
        let lhs_t = normal::<B, 2>([k, m], 0.0, 1.0, device);
        let big = normal::<B, 2>([k + 5, n], 0.0, 1.0, device);
        let rhs = big.narrow(0, 3, k);
        let want = acc.clone() + lhs_t.clone().transpose().matmul(rhs.clone());
        let run = |acc: Tensor<B, 2>| -> Tensor<B, 2> {
            Tensor::from_primitive(TensorPrimitive::Float(B::fused_matmul_add(
                acc.into_primitive().tensor(),
                lhs_t.clone().transpose().into_primitive().tensor(),
                rhs.clone().into_primitive().tensor(),
            )))
        };
        // Uniquely owned: a copy of the accumulator's values.
        let owned = Tensor::<B, 2>::from_data(acc.to_data(), device);
        let e = rel_diff(run(owned), want.clone());
        assert!(e <= 1e-5, "{m}x{k}x{n}: {e}");
        // Shared: the sum is right and the other holder still sees the old values.
        let before = acc.to_data();
        let e = rel_diff(run(acc.clone()), want);
        assert!(e <= 1e-5, "shared {m}x{k}x{n}: {e}");
        acc.to_data().assert_eq(&before, true);
    }
}

/// The backend's `(param, exp_avg, exp_avg_sq)` within 1e-6 relative of the reference's.
fn assert_adamw_close<B: burn::tensor::backend::Backend>(
    got: [&Tensor<B, 1>; 3],
    want: [&Tensor<B, 1>; 3],
    what: &str,
) {
    let e: Vec<f32> = (0..3)
        .map(|i| rel_diff(got[i].clone(), want[i].clone()))
        .collect();
    assert!(e.iter().all(|x| *x <= 1e-6), "adamw, {what}: {e:?}");
}

/// The backend's AdamW against the reference body (torch.optim.AdamW's single-tensor path,
/// operation by operation), over a few steps, with and without decay and clipping.
fn check_adamw<B: FusedBackend>(device: &B::Device) {
    use train_model::AdamWStep;
    let n = 70_001; // more than one parallel chunk, not a multiple of it
    let rnd = |std: f64| normal::<B, 1>([n], 0.0, std, device);
    let prim = |t: Tensor<B, 1>| t.into_primitive().tensor();
    let float = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p));
    let p0 = rnd(1.0);
    let p0_values = p0.to_data();
    // Step 1 shares `p0`'s storage (a backend that updates in place must not write into it);
    // steps 2 and 3 get tensors that own their storage (the in-place path where there is one).
    let (mut p1, mut m1, mut v1) = (p0.clone(), p0.zeros_like(), p0.zeros_like());
    let (mut p2, mut m2, mut v2) = (p0.clone(), p0.zeros_like(), p0.zeros_like());
    for (step, (weight_decay, grad_scale)) in [(0.01, 1.0), (0.0, 0.37), (0.1, 1.0)]
        .into_iter()
        .enumerate()
    {
        let g = rnd(0.1);
        let s = AdamWStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
            weight_decay,
            step: step as u64 + 1,
            grad_scale,
        };
        let (p, m, v) = B::fused_adamw(prim(p1), prim(g.clone()), prim(m1), prim(v1), &s);
        (p1, m1, v1) = (float(p), float(m), float(v));
        let (p, m, v) = reference::adamw::<B>(prim(p2), prim(g), prim(m2), prim(v2), &s);
        (p2, m2, v2) = (float(p), float(m), float(v));
        assert_adamw_close(
            [&p1, &m1, &v1],
            [&p2, &m2, &v2],
            &format!("step {}", step + 1),
        );
    }
    // The update moved the parameters (a check that cannot pass by doing nothing), and left the
    // tensor it shared storage with alone.
    assert_eq!(p0.to_data(), p0_values);
    assert!(rel_diff(p1, p0) > 1e-4);
}

/// AdamW with the gradient in the parameter's `[rows, cols]` shape as a transposed view (how
/// a projection's weight gradient arrives), against the reference given the same values:
/// shapes that are not multiples of the kernels' tiles, two steps so the second updates
/// moments the first produced (owned storage, the in-place path where there is one).
fn check_adamw_transposed_grad<B: FusedBackend>(device: &B::Device) {
    use train_model::AdamWStep;
    let prim = |t: Tensor<B, 1>| t.into_primitive().tensor();
    let float = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p));
    for [rows, cols] in [[37, 300], [16, 256], [2, 2], [300, 5]] {
        let n = rows * cols;
        let p0 = normal::<B, 1>([n], 0.0, 1.0, device);
        let (mut p1, mut m1, mut v1) = (p0.clone() * 1.0, p0.zeros_like(), p0.zeros_like());
        let (mut p2, mut m2, mut v2) = (p0.clone() * 1.0, p0.zeros_like(), p0.zeros_like());
        for step in 1..=2u64 {
            // `[cols, rows]` contiguous, seen as `[rows, cols]`.
            let g = normal::<B, 2>([cols, rows], 0.0, 0.1, device).transpose();
            let flat = g.clone().reshape([n]);
            let s = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.01,
                step,
                grad_scale: 0.5,
            };
            let (p, m, v) = B::fused_adamw(
                prim(p1),
                g.into_primitive().tensor(),
                prim(m1),
                prim(v1),
                &s,
            );
            (p1, m1, v1) = (float(p), float(m), float(v));
            let (p, m, v) = reference::adamw::<B>(prim(p2), prim(flat), prim(m2), prim(v2), &s);
            (p2, m2, v2) = (float(p), float(m), float(v));
            let what = format!("transposed gradient {rows}x{cols}, step {step}");
            assert_adamw_close([&p1, &m1, &v1], [&p2, &m2, &v2], &what);
        }
        assert!(
            rel_diff(p1, p0) > 1e-4,
            "{rows}x{cols}: the update moved nothing"
        );
    }
}

/// The backend's softmax cross-entropy (loss sum and logit gradient) against the reference
/// body, over shapes with one row, one vocabulary entry, rows longer than a parallel chunk and
/// several tasks of rows; logits shared with another tensor are left untouched.
fn check_cross_entropy<B: FusedBackend>(device: &B::Device) {
    for (rows, vocab) in [
        (1usize, 1usize),
        (3, 7),
        (5, 50_000),
        (700, 100),
        (33, 49_152),
    ] {
        let logits = normal::<B, 2>([rows, vocab], 0.0, 3.0, device);
        let targets: Vec<i64> = (0..rows)
            .map(|r| i64::try_from((r * 7919 + 3) % vocab).unwrap())
            .collect();
        let t = || {
            Tensor::<B, 1, Int>::from_data(TensorData::new(targets.clone(), [rows]), device)
                .into_primitive()
        };
        let scale = 0.37;
        let float1 = |p| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(p));
        let float2 = |p| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(p));
        let (ref_sum, ref_grad) =
            reference::cross_entropy::<B>(logits.clone().into_primitive().tensor(), t(), scale);
        // A copy that owns its storage (the in-place path where a backend has one) and the
        // original, still shared with `logits` (which must come out unchanged).
        let own = Tensor::<B, 2>::from_data(logits.to_data(), device);
        let before = logits.to_data();
        for input in [own, logits.clone()] {
            let (sum, grad) = B::fused_cross_entropy(input.into_primitive().tensor(), t(), scale);
            let (sum, grad) = (float1(sum), float2(grad));
            let e = [
                rel_diff(sum, float1(ref_sum.clone())),
                rel_diff(grad.clone(), float2(ref_grad.clone())),
            ];
            assert!(
                e.iter().all(|x| *x <= 1e-5),
                "cross entropy {rows}x{vocab}: {e:?}"
            );
            // Each row of (softmax − one_hot) · scale sums to zero, and is not all zeros
            // (a vocabulary of one gives zeros).
            let row_sums: Vec<f32> = grad.clone().sum_dim(1).into_data().to_vec().unwrap();
            assert!(row_sums.iter().all(|s| s.abs() < 1e-4), "{row_sums:?}");
            let largest: f32 = grad.abs().max().into_data().to_vec::<f32>().unwrap()[0];
            assert!(vocab == 1 || largest > 1e-3, "{largest}");
        }
        assert_eq!(logits.to_data(), before);
    }
}

/// The embedding lookup ([`train_model::embedding`]) against `select`, and its gradient
/// through autodiff against a sum written out on the host and against the reference body:
/// repeated ids (their rows summed), the padding id's positions left out, a padding id no
/// position holds, no padding, every position padding (a zero gradient), and more rows than
/// the table has.
fn check_embedding<B: FusedBackend>(device: &B::Device) {
    let spread: Vec<i64> = (0..257i64).map(|i| i * 7 % 300).collect();
    for (vocab, width, ids, padding) in [
        (7usize, 3usize, vec![0i64, 3, 3, 6, 0, 3], Some(3i64)),
        (7, 3, vec![0, 3, 3, 6, 0, 3], None),
        (5, 4, vec![4, 4, 4], Some(2)),
        (1, 1, vec![0], Some(0)),
        (300, 33, spread, Some(0)),
    ] {
        let n = ids.len();
        let table = normal::<B, 2>([vocab, width], 0.0, 1.0, device);
        let grad = normal::<B, 2>([n, width], 0.0, 1.0, device);
        let idt = || Tensor::<B, 1, Int>::from_data(TensorData::new(ids.clone(), [n]), device);

        let looked = train_model::embedding(table.clone(), idt(), padding);
        assert_eq!(looked.to_data(), table.clone().select(0, idt()).to_data());

        let t = Tensor::<Autodiff<B>, 2>::from_inner(table.clone()).require_grad();
        let y = train_model::embedding(t.clone(), Tensor::from_inner(idt()), padding);
        let grads = (y * Tensor::<Autodiff<B>, 2>::from_inner(grad.clone()))
            .sum()
            .backward();
        let got = t.grad(&grads).expect("the table's gradient");

        let g: Vec<f32> = grad.to_data().to_vec().unwrap();
        let mut want = vec![0f32; vocab * width];
        for (r, &id) in ids.iter().enumerate() {
            if Some(id) != padding {
                let id = usize::try_from(id).unwrap();
                for c in 0..width {
                    want[id * width + c] += g[r * width + c];
                }
            }
        }
        let want = Tensor::<B, 2>::from_data(TensorData::new(want, [vocab, width]), device);
        let reference = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(
            reference::embedding_backward::<B>(
                grad.clone().into_primitive().tensor(),
                idt().into_primitive(),
                vocab,
                padding,
            ),
        ));
        let e = [
            rel_diff(got.clone(), want.clone()),
            rel_diff(reference, want.clone()),
        ];
        assert!(
            e.iter().all(|x| *x <= 1e-6),
            "embedding {vocab}x{width}: {e:?}"
        );
        if let Some(pad) = padding
            .and_then(|p| usize::try_from(p).ok())
            .filter(|p| *p < vocab)
        {
            let row: Vec<f32> = got.narrow(0, pad, 1).into_data().to_vec().unwrap();
            assert!(row.iter().all(|v| *v == 0.0), "padding row {row:?}");
        }
    }
}

/// A tensor's sum of squares (the global gradient norm's terms) against the reference body
/// and an f64 sum on the host: contiguous, a transposed view (a weight gradient as the matmul
/// backward leaves it), one element, and more elements than a parallel chunk.
fn check_sum_squares<B: FusedBackend>(device: &B::Device) {
    for (rows, cols) in [(1usize, 1usize), (3, 5), (70, 1000), (257, 129)] {
        let x = normal::<B, 2>([rows, cols], 0.0, 2.0, device);
        let host: f64 = x
            .to_data()
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        for view in [x.clone(), x.clone().transpose()] {
            let got = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::fused_sum_squares(
                view.clone().into_primitive().tensor(),
            )));
            let reference = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(
                reference::sum_squares::<B>(view.into_primitive().tensor()),
            ));
            assert_eq!(got.dims(), [1]);
            for (what, t) in [("fused", got), ("reference", reference)] {
                let v = f64::from(t.into_data().to_vec::<f32>().unwrap()[0]);
                assert!(
                    (v - host).abs() <= 1e-5 * host.max(1.0),
                    "{what} {rows}x{cols}: {v} vs {host}"
                );
            }
        }
    }
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..3,
        prop::sample::select(vec![(1usize, 1usize), (2, 1), (4, 2), (3, 3), (6, 2)]),
        1usize..20,
        0usize..4,
        prop::sample::select(vec![2usize, 4, 8]),
        prop::option::of(1usize..24),
        prop::option::of(prop::sample::select(vec![1.0f64, 5.0])),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(b, (h, kvh), sq, past, d, window, softcap, packed, seed)| {
                let sk = past + sq;
                let segments = packed.then(|| {
                    (0..b)
                        .map(|r| {
                            // Segment lengths from the seed: 1 ..= 4 each, covering sk.
                            let mut lens = Vec::new();
                            let mut left = sk;
                            let mut x = seed.wrapping_add(r as u64);
                            while left > 0 {
                                x = x
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                let n = ((x >> 33) as usize % 4 + 1).min(left);
                                lens.push(n);
                                left -= n;
                            }
                            lens
                        })
                        .collect()
                });
                Case {
                    b,
                    h,
                    kvh,
                    sq,
                    past,
                    d,
                    window,
                    softcap,
                    segments,
                }
            },
        )
}

macro_rules! backend_tests {
    ($module:ident, $backend:ty, $device:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn attention_matches_the_decomposed_path() {
                for c in named_cases() {
                    check_attention::<$backend>(&c, &$device);
                }
            }

            #[test]
            fn adamw_matches_the_reference_step() {
                check_adamw::<$backend>(&$device);
            }

            #[test]
            fn adamw_reads_a_transposed_gradient() {
                check_adamw_transposed_grad::<$backend>(&$device);
            }

            #[test]
            fn cross_entropy_matches_the_reference() {
                check_cross_entropy::<$backend>(&$device);
            }

            #[test]
            fn embedding_and_its_gradient_match_select_and_a_host_sum() {
                check_embedding::<$backend>(&$device);
            }

            #[test]
            fn sum_squares_matches_a_host_sum_on_any_layout() {
                check_sum_squares::<$backend>(&$device);
            }

            #[test]
            fn matmul_add_matches_the_plain_sum() {
                check_matmul_add::<$backend>(&$device);
            }

            #[test]
            fn gated_linear_matches_the_gate_and_a_matmul() {
                check_gated_linear::<$backend>(&$device);
            }

            #[test]
            fn rms_norm_linears_match_the_norm_and_matmuls() {
                check_rms_norm_linears::<$backend>(&$device);
            }

            #[test]
            fn norm_gate_and_rotary_match_the_decomposed_path() {
                check_norm_gate_rotary::<$backend>(&$device);
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases(24))]
                #[test]
                fn attention_matches_over_shapes(c in case_strategy()) {
                    check_attention::<$backend>(&c, &$device);
                }
            }
        }
    };
}

#[cfg(feature = "cpu")]
backend_tests!(cpu, burn::backend::Flex, Default::default());

#[cfg(feature = "tch")]
backend_tests!(
    tch,
    burn::backend::LibTorch,
    burn::backend::libtorch::LibTorchDevice::Cpu
);

// Runs on a machine with an NVIDIA GPU (`cargo xtask bench-gpu` runs it first); CI only
// compiles it.
#[cfg(feature = "cuda")]
backend_tests!(cuda, burn::backend::Cuda, Default::default());
