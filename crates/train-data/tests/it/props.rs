//! Property tests against naive reference implementations: label masks, truncation, packing,
//! splitting.

use std::collections::BTreeSet;
use std::path::Path;

use proptest::prelude::*;
use train_data::{
    Batch, ChatTokenizer, Conversation, Example, Fitted, IGNORE_INDEX, Message, Role, Sequence,
    Truncation, ValidationSplit, best_fit_decreasing, fit, pack_examples, split_indices,
};

fn tokenizer(arch: &str) -> ChatTokenizer {
    ChatTokenizer::from_model_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(arch),
    )
    .unwrap()
}

/// Text without leading / trailing whitespace (templates such as Llama's trim content).
fn text() -> impl Strategy<Value = String> {
    "[A-Za-z0-9 .,!?é日🌱]{0,20}[A-Za-z0-9.!?é日🌱]"
        .prop_map(|s| s.trim().to_string())
        .prop_filter("non-empty", |s| !s.is_empty())
}

fn conversation() -> impl Strategy<Value = Conversation> {
    (
        proptest::option::of(text()),
        proptest::collection::vec((text(), text()), 1..4),
    )
        .prop_map(|(system, turns)| {
            let mut m = Vec::new();
            if let Some(s) = system {
                m.push(Message::new(Role::System, s));
            }
            for (u, a) in turns {
                m.push(Message::new(Role::User, u));
                m.push(Message::new(Role::Assistant, a));
            }
            Conversation::new(m)
        })
}

/// Naive reference of the masking rule: mark every byte of the rendered text that lies in an
/// assistant turn (after the generation prompt, through the end-of-turn string); a token is a
/// label when its first byte is marked.
fn naive_labels(tok: &ChatTokenizer, c: &Conversation, eot: &str) -> Vec<i32> {
    let full = tok.template().render(&c.messages, false).unwrap();
    let mut marked = vec![false; full.len()];
    for (i, m) in c.messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let start = tok.template().render(&c.messages[..i], true).unwrap().len();
        let end = start + full[start..].find(eot).unwrap() + eot.len();
        for b in &mut marked[start..end] {
            *b = true;
        }
    }
    let enc = tok.tokenizer().encode(full.as_str(), false).unwrap();
    enc.get_ids()
        .iter()
        .zip(enc.get_offsets())
        .map(|(&id, &(a, _))| if marked[a] { id as i32 } else { IGNORE_INDEX })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn labels_match_the_naive_reference(c in conversation()) {
        for (arch, eot) in [("qwen2", "<|im_end|>"), ("llama", "<|eot_id|>"), ("qwen3", "<|im_end|>")] {
            let tok = tokenizer(arch);
            let enc = tok.encode(&c).unwrap();
            prop_assert_eq!(&enc.labels, &naive_labels(&tok, &c, eot), "{}", arch);
            // Every label is the token at its position.
            prop_assert!(enc.labels.iter().zip(&enc.input_ids).all(|(&l, &t)| l == IGNORE_INDEX || l as u32 == t));
        }
        // ChatML: the trained text is exactly each answer followed by <|im_end|>.
        let tok = tokenizer("qwen2");
        let enc = tok.encode(&c).unwrap();
        let trained: Vec<u32> = enc.labels.iter().filter(|&&l| l != IGNORE_INDEX).map(|&l| l as u32).collect();
        let expect: String = c.messages.iter().filter(|m| m.role == Role::Assistant).map(|m| format!("{}<|im_end|>", m.content)).collect();
        prop_assert_eq!(tok.tokenizer().decode(&trained, false).unwrap(), expect);
    }

    #[test]
    fn truncation_keeps_a_prefix(n in 0usize..50, max in 1usize..40, drop in any::<bool>()) {
        let ex = Example { row: 0, input_ids: (0..n as u32).collect(), labels: (0..n as i32).collect() };
        let mode = if drop { Truncation::Drop } else { Truncation::Truncate };
        match fit(ex.clone(), max, mode) {
            Fitted::Unchanged(e) => { prop_assert!(n <= max); prop_assert_eq!(e, ex); }
            Fitted::Truncated { example, lost } => {
                prop_assert!(!drop && n > max);
                prop_assert_eq!(example.len(), max);
                prop_assert_eq!(lost, n - max);
                prop_assert_eq!(&example.input_ids[..], &ex.input_ids[..max]);
                prop_assert_eq!(&example.labels[..], &ex.labels[..max]);
            }
            Fitted::Dropped { tokens } => { prop_assert!(drop && n > max); prop_assert_eq!(tokens, n); }
        }
    }

    #[test]
    fn packing_loses_nothing_and_respects_capacity(lengths in proptest::collection::vec(1usize..40, 0..60), capacity in 8usize..64) {
        let bins = best_fit_decreasing(&lengths, capacity);
        let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>(), "every item exactly once");
        for bin in &bins {
            let total: usize = bin.iter().map(|&i| lengths[i]).sum();
            prop_assert!(total <= capacity || bin.len() == 1, "bin over capacity: {:?}", bin);
        }
        // First fit decreasing never needs more than 11/9 OPT + 1 bins; a simple lower bound check:
        let fitting: usize = lengths.iter().filter(|&&l| l <= capacity).sum();
        prop_assert!(bins.len() >= fitting.div_ceil(capacity));

        let examples: Vec<Example> = lengths.iter().enumerate().map(|(row, &n)| Example {
            row,
            input_ids: (0..n as u32).map(|t| t + 1000 * row as u32).collect(),
            labels: (0..n as i32).map(|t| if t % 3 == 0 { IGNORE_INDEX } else { t }).collect(),
        }).collect();
        let (rows, efficiency) = pack_examples(&examples, capacity);
        prop_assert!(efficiency <= 1.0 + 1e-12);
        let tokens: usize = rows.iter().map(Sequence::len).sum();
        prop_assert_eq!(tokens, lengths.iter().sum::<usize>(), "no token lost or duplicated");
        let label_tokens: usize = rows.iter().map(Sequence::label_tokens).sum();
        prop_assert_eq!(label_tokens, examples.iter().map(Example::label_tokens).sum::<usize>());
        for r in &rows {
            // Positions restart at each segment; segments are 0, 1, 2… in order.
            for t in 0..r.len() {
                let new_segment = t == 0 || r.segment_ids[t] != r.segment_ids[t - 1];
                prop_assert_eq!(r.position_ids[t] == 0, new_segment);
                if new_segment { prop_assert_eq!(r.labels[t], IGNORE_INDEX); }
                if t > 0 { prop_assert!(r.segment_ids[t] >= r.segment_ids[t - 1]); }
            }
        }
        // Padding collation keeps every label too.
        let refs: Vec<&Example> = examples.iter().collect();
        let padded = Batch::padded(&refs, 0);
        prop_assert_eq!(padded.label_tokens, label_tokens);
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete(n in 0usize..300, f in 0.0f64..0.9, seed in any::<u64>()) {
        let split = ValidationSplit::Fraction(f);
        let (train, val) = split_indices(n, split, seed);
        prop_assert_eq!((train.clone(), val.clone()), split_indices(n, split, seed));
        prop_assert_eq!(val.len(), split.count(n));
        let all: BTreeSet<usize> = train.iter().chain(&val).copied().collect();
        prop_assert_eq!(all.len(), n);
        prop_assert!(train.iter().all(|i| !val.contains(i)));
    }
}
