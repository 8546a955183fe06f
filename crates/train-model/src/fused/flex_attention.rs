//! Attention forward and backward for burn's Flex backend on f32 slices.
//!
//! The reference body ([`mod@super::reference`]) tiles in burn tensor ops; on Flex every
//! broadcast in it (the mask bias, `s − lse`, `dp − δ`) runs through a strided element iterator
//! and every `exp` calls libm, which made attention the largest cost after the GEMMs. Here each
//! head is one task (a `(batch, key/value head)` pair in the backward, which owns its `dK` and
//! `dV`): blocks of [`BLOCK_ROWS`] query rows, the scores `scale · Q Kᵀ` of the keys the block
//! can see by `gemm` (the crate Flex's own matmul uses) into one scratch buffer, the mask,
//! softmax and its gradient as plain loops over rows (a polynomial `exp` the compiler
//! vectorises), and the products with `V`, `K` and `Q` by `gemm` again. Never an `[s, s]`
//! tensor per head.
//!
//! The floating-point operations are the reference's, in its order per element (scores scaled
//! after the product, `p = e / Σe`, `lse = max + ln Σe`, `dS = P ∘ (dP − δ) · scale`); sums
//! over keys and the `exp` polynomial differ within rounding. Calls it does not cover (softcap,
//! non-f32 dtypes, keys other than `past + sq`, a row whose own key is in another segment)
//! take the reference body.

use std::borrow::Cow;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::AttentionSpec;
use super::flex::{exp_neg, tensor, values as f32_values};

/// Query rows per block: the scratch scores are `BLOCK_ROWS × keys` f32 per task.
const BLOCK_ROWS: usize = 128;

fn int_values(t: &FlexTensor) -> Option<Vec<i64>> {
    let t = t.to_contiguous();
    match t.dtype() {
        DType::I64 => Some(t.as_slice::<i64>()?.to_vec()),
        DType::I32 => Some(t.as_slice::<i32>()?.iter().map(|&x| i64::from(x)).collect()),
        _ => None,
    }
}

fn dims4(t: &FlexTensor) -> Option<[usize; 4]> {
    t.layout().shape().to_vec().try_into().ok()
}

/// Which keys each query row sees.
struct Mask<'a> {
    causal: bool,
    past: usize,
    window: Option<usize>,
    sk: usize,
    /// This batch row's segments as runs: `runs[j]` is the `[lo, hi)` of the run of equal
    /// segment ids that holds key `j`, when every segment is one contiguous run (packed rows,
    /// padding-free batches); the ranges are then exact and no id is compared.
    runs: Option<&'a [(usize, usize)]>,
    /// This batch row's query and key segment ids, when rows are segmented but some segment is
    /// not one contiguous run.
    segments: Option<(&'a [i64], &'a [i64])>,
}

impl Mask<'_> {
    /// Keys `[lo, hi)` query `i` may see by position and, with runs, by segment.
    fn range(&self, i: usize) -> (usize, usize) {
        let p = self.past + i;
        let mut hi = if self.causal {
            (p + 1).min(self.sk)
        } else {
            self.sk
        };
        let mut lo = match self.window {
            Some(w) => (p + 1).saturating_sub(w).min(hi),
            None => 0,
        };
        if let Some(&(run_lo, run_hi)) = self.runs.and_then(|r| r.get(p)) {
            hi = hi.min(run_hi);
            lo = lo.max(run_lo).min(hi);
        }
        (lo, hi)
    }

    /// Keys `[k0, k1)` any of the queries `q0 .. q0 + rows` sees (a block from [`Self::blocks`]:
    /// within one run, where both ends of the range grow with the query).
    fn block(&self, q0: usize, rows: usize) -> (usize, usize) {
        (self.range(q0).0, self.range(q0 + rows - 1).1)
    }

    /// The query blocks `(q0, rows)` of at most [`BLOCK_ROWS`] rows, split where a run of
    /// segments ends so that no block computes scores of another segment's keys.
    fn blocks(&self, sq: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(sq.div_ceil(BLOCK_ROWS));
        let mut q0 = 0;
        while q0 < sq {
            let mut end = (q0 + BLOCK_ROWS).min(sq);
            if let Some(&(_, run_hi)) = self.runs.and_then(|r| r.get(self.past + q0)) {
                end = end.min(run_hi.saturating_sub(self.past)).max(q0 + 1);
            }
            out.push((q0, end - q0));
            q0 = end;
        }
        out
    }

    /// Sets the scores of row `i` (keys from `k0`) that it may not see to −∞.
    fn apply(&self, i: usize, k0: usize, row: &mut [f32]) {
        let (lo, hi) = self.range(i);
        for (j, s) in row.iter_mut().enumerate() {
            let key = k0 + j;
            if key < lo || key >= hi {
                *s = f32::NEG_INFINITY;
            }
        }
        if let Some((sq, sk)) = self.segments {
            let own = sq[i];
            for (s, &seg) in row.iter_mut().zip(&sk[k0..]) {
                if seg != own {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// For each key of each batch row, the `[lo, hi)` of its run of equal segment ids, or `None`
/// when some row has a segment in more than one run.
fn key_runs(ids: &[i64], rows: usize, sk: usize) -> Option<Vec<(usize, usize)>> {
    let runs = super::segment_runs(ids, rows, sk)?;
    Some(
        runs.iter()
            .flatten()
            .flat_map(|&(lo, hi)| std::iter::repeat_n((lo, hi), hi - lo))
            .collect(),
    )
}

/// `dst[m × n] (= dst +) beta · lhs[m × k] · rhs[k × n]`, each operand by its row and column
/// strides; panics (an invariant, never user input) when an operand would be read or written
/// past its slice.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(super) fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        last(m, n, dst_rs, 1) < dst.len(),
        "attention gemm: dst out of bounds"
    );
    if k > 0 {
        assert!(
            last(m, k, lhs_rs, lhs_cs) < lhs.len(),
            "attention gemm: lhs out of bounds"
        );
        assert!(
            last(k, n, rhs_rs, rhs_cs) < rhs.len(),
            "attention gemm: rhs out of bounds"
        );
    }
    let i = |x: usize| x as isize;
    // SAFETY: every element gemm reads or writes lies at `row · rs + col · cs` inside its slice
    // (checked above: the largest such offset is in bounds and strides are non-negative); `dst`
    // is borrowed mutably, so it aliases neither input; gemm reads no element when `k == 0`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            i(dst_rs),
            accumulate,
            lhs.as_ptr(),
            i(lhs_cs),
            i(lhs_rs),
            rhs.as_ptr(),
            i(rhs_cs),
            i(rhs_rs),
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The inputs of one call, as contiguous f32 slices with their shapes checked.
struct Inputs<'a> {
    q: Cow<'a, [f32]>,
    k: Cow<'a, [f32]>,
    v: Cow<'a, [f32]>,
    dims: [usize; 4],
    kvh: usize,
    sk: usize,
    segments: Option<(Vec<i64>, Vec<i64>)>,
    /// [`key_runs`] of the keys, when every segment is one run.
    runs: Option<Vec<(usize, usize)>>,
}

impl<'a> Inputs<'a> {
    fn new(
        q: &'a FlexTensor,
        k: &'a FlexTensor,
        v: &'a FlexTensor,
        segments: Option<&(FlexTensor, FlexTensor)>,
        spec: &AttentionSpec,
    ) -> Option<Self> {
        let [b, h, sq, d] = dims4(q)?;
        let [kb, kvh, sk, kd] = dims4(k)?;
        if spec.softcap.is_some()
            || dims4(v)? != [kb, kvh, sk, kd]
            || kb != b
            || kd != d
            || kvh == 0
            || h % kvh != 0
            || sk != spec.past + sq
            || b * h * sq * d == 0
        {
            return None;
        }
        let segments = match segments {
            None => None,
            Some((a, c)) => {
                let (a, c) = (int_values(a)?, int_values(c)?);
                // Every row must see its own key (so no row is masked whole, where the
                // reference's finite bias gives a uniform row instead).
                let own = |bi: usize, i: usize| a[bi * sq + i] == c[bi * sk + spec.past + i];
                if a.len() != b * sq
                    || c.len() != b * sk
                    || !(0..b).all(|bi| (0..sq).all(|i| own(bi, i)))
                {
                    return None;
                }
                Some((a, c))
            }
        };
        let runs = segments.as_ref().and_then(|(_, c)| key_runs(c, b, sk));
        Some(Self {
            q: f32_values(q)?,
            k: f32_values(k)?,
            v: f32_values(v)?,
            dims: [b, h, sq, d],
            kvh,
            sk,
            segments,
            runs,
        })
    }

    fn mask(&self, spec: &AttentionSpec, batch: usize) -> Mask<'_> {
        let [_, _, sq, _] = self.dims;
        Mask {
            causal: spec.causal,
            past: spec.past,
            window: spec.window.filter(|w| *w > 0),
            sk: self.sk,
            runs: self
                .runs
                .as_ref()
                .map(|r| &r[batch * self.sk..(batch + 1) * self.sk]),
            segments: self
                .segments
                .as_ref()
                .filter(|_| self.runs.is_none())
                .map(|(a, c)| {
                    (
                        &a[batch * sq..(batch + 1) * sq],
                        &c[batch * self.sk..(batch + 1) * self.sk],
                    )
                }),
        }
    }

    /// Query head `head` of batch row `batch` (`[sq, d]`), and its key and value heads.
    fn head(&self, batch: usize, head: usize) -> (&[f32], &[f32], &[f32]) {
        let [_, h, sq, d] = self.dims;
        let kv = batch * self.kvh + head / (h / self.kvh);
        let qn = sq * d;
        let kn = self.sk * d;
        let qo = (batch * h + head) * qn;
        (
            &self.q[qo..qo + qn],
            &self.k[kv * kn..(kv + 1) * kn],
            &self.v[kv * kn..(kv + 1) * kn],
        )
    }
}

/// `scale · Q Kᵀ` of the queries `q0 .. q0 + rows` and keys `k0 .. k1` into `s` (`rows × n`).
#[allow(clippy::too_many_arguments)]
fn scores(
    q: &[f32],
    k: &[f32],
    d: usize,
    q0: usize,
    rows: usize,
    (k0, k1): (usize, usize),
    scale: f32,
    s: &mut [f32],
) {
    let n = k1 - k0;
    gemm(
        (rows, n, d),
        s,
        n,
        false,
        (&q[q0 * d..], d, 1),
        // Kᵀ: element (c, j) is K[k0 + j][c].
        (&k[k0 * d..], 1, d),
        scale,
        gemm::Parallelism::None,
    );
}

/// Forward of one head: writes its output rows `[sq, d]` and log-sum-exps `[sq]`.
#[allow(clippy::too_many_arguments)]
fn forward_head(
    (q, k, v): (&[f32], &[f32], &[f32]),
    mask: &Mask<'_>,
    d: usize,
    scale: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let sq = lse.len();
    let mut s = Vec::new();
    for (q0, rows) in mask.blocks(sq) {
        let (k0, k1) = mask.block(q0, rows);
        let n = k1 - k0;
        s.resize(rows * n, 0.0);
        scores(q, k, d, q0, rows, (k0, k1), scale, &mut s);
        for (r, row) in s.chunks_mut(n).enumerate() {
            mask.apply(q0 + r, k0, row);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for x in row.iter_mut() {
                *x = if *x == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp_neg(*x - max)
                };
                sum += *x;
            }
            for x in row.iter_mut() {
                *x /= sum;
            }
            lse[q0 + r] = max + sum.ln();
        }
        gemm(
            (rows, d, n),
            &mut out[q0 * d..],
            d,
            false,
            (&s, n, 1),
            (&v[k0 * d..], d, 1),
            1.0,
            gemm::Parallelism::None,
        );
    }
}

/// Attention output `[b, h, sq, d]` and log-sum-exp `[b, h, sq]`, or `None` for the reference.
pub(super) fn forward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    segments: Option<&(FlexTensor, FlexTensor)>,
    spec: &AttentionSpec,
) -> Option<(FlexTensor, FlexTensor)> {
    let x = Inputs::new(q, k, v, segments, spec)?;
    let [b, h, sq, d] = x.dims;
    let mut out = vec![0f32; b * h * sq * d];
    let mut lse = vec![0f32; b * h * sq];
    let scale = spec.scale as f32;
    out.par_chunks_mut(sq * d)
        .zip(lse.par_chunks_mut(sq))
        .enumerate()
        .for_each(|(t, (out, lse))| {
            let (batch, head) = (t / h, t % h);
            let mask = x.mask(spec, batch);
            forward_head(x.head(batch, head), &mask, d, scale, out, lse);
        });
    // The output comes back laid out as `[b, sq, h, d]` (a view of it with the head and query
    // axes swapped, as libtorch's flash kernel returns it): the model's next step, back to
    // `[b, sq, h · d]` for the output projection, is then a view, not a copy that the
    // projection would keep beside the `out` the autodiff node keeps for its backward.
    let mut rows = vec![0f32; out.len()];
    rows.par_chunks_mut(h * d).enumerate().for_each(|(r, dst)| {
        let (batch, i) = (r / sq, r % sq);
        for (head, dst) in dst.chunks_mut(d).enumerate() {
            let o = ((batch * h + head) * sq + i) * d;
            dst.copy_from_slice(&out[o..o + d]);
        }
    });
    drop(out);
    let out = Flex::float_swap_dims(tensor(rows, Shape::from([b, sq, h, d])), 1, 2);
    Some((out, tensor(lse, Shape::from([b, h, sq]))))
}

/// The gradients `(dq, dk, dv)`, or `None` for the reference.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    out: &FlexTensor,
    lse: &FlexTensor,
    grad: &FlexTensor,
    segments: Option<&(FlexTensor, FlexTensor)>,
    spec: &AttentionSpec,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let x = Inputs::new(q, k, v, segments, spec)?;
    let [b, h, sq, d] = x.dims;
    let (o, g, l) = (f32_values(out)?, f32_values(grad)?, f32_values(lse)?);
    if o.len() != b * h * sq * d || g.len() != o.len() || l.len() != b * h * sq {
        return None;
    }
    let (kvh, sk) = (x.kvh, x.sk);
    let group = h / kvh;
    let mut dq = vec![0f32; b * h * sq * d];
    let mut dk = vec![0f32; b * kvh * sk * d];
    let mut dv = vec![0f32; b * kvh * sk * d];
    // Fewer (batch, kv head) tasks than threads: let each task's GEMMs use the pool instead.
    let tasks = b * kvh;
    let par = if tasks < rayon::current_num_threads() {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let scale = spec.scale as f32;
    dq.par_chunks_mut(group * sq * d)
        .zip(dk.par_chunks_mut(sk * d))
        .zip(dv.par_chunks_mut(sk * d))
        .enumerate()
        .for_each(|(t, ((dq, dk), dv))| {
            let (batch, kv) = (t / kvh, t % kvh);
            let mask = x.mask(spec, batch);
            let blocks = mask.blocks(sq);
            let (mut p, mut ds) = (Vec::new(), Vec::new());
            for (hh, dq) in dq.chunks_mut(sq * d).enumerate() {
                let head = kv * group + hh;
                let (qh, kh, vh) = x.head(batch, head);
                let at = (batch * h + head) * sq;
                let (oh, gh) = (&o[at * d..(at + sq) * d], &g[at * d..(at + sq) * d]);
                let lh = &l[at..at + sq];
                for &(q0, rows) in &blocks {
                    let (k0, k1) = mask.block(q0, rows);
                    let n = k1 - k0;
                    p.resize(rows * n, 0.0);
                    ds.resize(rows * n, 0.0);
                    scores(qh, kh, d, q0, rows, (k0, k1), scale, &mut p);
                    // dP = dO Vᵀ.
                    gemm(
                        (rows, n, d),
                        &mut ds,
                        n,
                        false,
                        (&gh[q0 * d..], d, 1),
                        (&vh[k0 * d..], 1, d),
                        1.0,
                        par,
                    );
                    for (r, (prow, dsrow)) in p.chunks_mut(n).zip(ds.chunks_mut(n)).enumerate() {
                        let i = q0 + r;
                        mask.apply(i, k0, prow);
                        let lse_i = lh[i];
                        for x in prow.iter_mut() {
                            *x = if *x == f32::NEG_INFINITY {
                                0.0
                            } else {
                                exp_neg(*x - lse_i)
                            };
                        }
                        let delta: f32 = gh[i * d..(i + 1) * d]
                            .iter()
                            .zip(&oh[i * d..(i + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum();
                        for (s, &pv) in dsrow.iter_mut().zip(prow.iter()) {
                            *s = pv * (*s - delta) * scale;
                        }
                    }
                    // dQ = dS K; dK += dSᵀ Q; dV += Pᵀ dO.
                    gemm(
                        (rows, d, n),
                        &mut dq[q0 * d..],
                        d,
                        false,
                        (&ds, n, 1),
                        (&kh[k0 * d..], d, 1),
                        1.0,
                        par,
                    );
                    for (acc, factor, by) in [(&mut *dk, &ds, qh), (&mut *dv, &p, gh)] {
                        gemm(
                            (n, d, rows),
                            &mut acc[k0 * d..],
                            d,
                            true,
                            (factor, 1, n),
                            (&by[q0 * d..], d, 1),
                            1.0,
                            par,
                        );
                    }
                }
            }
        });
    Some((
        tensor(dq, Shape::from([b, h, sq, d])),
        tensor(dk, Shape::from([b, kvh, sk, d])),
        tensor(dv, Shape::from([b, kvh, sk, d])),
    ))
}

#[cfg(test)]
mod tests {
    use super::exp_neg;

    #[test]
    fn exp_is_within_two_ulp_of_libm_on_softmax_arguments() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (f64::from(exp_neg(x)), f64::from(x.exp()));
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(-1000.0) < 1e-37);
    }
}
