//! Every standard processor against the output of its `transformers` counterpart on the same
//! random logits (fixtures written by `cargo xtask fixtures`).

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use train_logits::{ProcessorConfig, ProcessorContext, RowContext};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32);
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (v, t.shape().to_vec())
}

fn ids(st: &SafeTensors<'_>, name: &str) -> Vec<Vec<u32>> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::I64);
    let cols = t.shape()[1];
    let flat: Vec<u32> = t
        .data()
        .chunks_exact(8)
        .map(|b| u32::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
        .collect();
    flat.chunks(cols).map(<[u32]>::to_vec).collect()
}

/// The processor configurations, in the order of the `case<i>` tensors.
fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("processors.reference.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["config"].clone())
        .collect()
}

#[test]
fn standard_processors_match_transformers() {
    let bytes = std::fs::read(fixtures().join("processors.reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (logits, shape) = f32s(&st, "logits");
    let vocab = shape[1];
    let rows = ids(&st, "input_ids");
    let eos = [3u32, 9];
    let ctx = ProcessorContext {
        tokenizer: None,
        end_ids: &eos,
    };
    let cases = cases();
    assert_eq!(
        cases.len(),
        st.names().iter().filter(|n| n.starts_with("case")).count()
    );
    let mut worst = 0.0f32;
    let mut filtered = 0usize;
    for (i, case) in cases.iter().enumerate() {
        let config: ProcessorConfig = serde_json::from_value(case.clone()).unwrap();
        let mut p = config.build(&ctx).unwrap();
        p.start(rows.len());
        let (want, _) = f32s(&st, &format!("case{i}"));
        for (r, row_ids) in rows.iter().enumerate() {
            let mut got = logits[r * vocab..(r + 1) * vocab].to_vec();
            p.process(r, &RowContext::new(row_ids, 6), &mut got)
                .unwrap();
            for (t, (&g, &w)) in got
                .iter()
                .zip(&want[r * vocab..(r + 1) * vocab])
                .enumerate()
            {
                if w == f32::NEG_INFINITY || g == f32::NEG_INFINITY {
                    assert_eq!(g, w, "case {i} {case}: row {r}, token {t}");
                    filtered += 1;
                } else {
                    let err = (g - w).abs() / w.abs().max(1.0);
                    assert!(
                        err <= 1e-6,
                        "case {i} {case}: row {r} token {t}: {g} vs {w}"
                    );
                    worst = worst.max(err);
                }
            }
        }
    }
    eprintln!(
        "{} processor cases × {} rows match transformers: worst relative error {worst:.1e}, {filtered} filtered (−∞) logits identical",
        cases.len(),
        rows.len()
    );
    assert!(filtered > 0);
}
