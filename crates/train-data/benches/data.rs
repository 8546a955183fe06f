//! Hot paths of data preparation: rendering + tokenizing + masking conversations, packing.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use train_data::{ChatTokenizer, Conversation, Message, Role, best_fit_decreasing};

fn conversations(n: usize) -> Vec<Conversation> {
    (0..n)
        .map(|i| {
            Conversation::new(vec![
                Message::new(Role::System, "You are a helpful assistant."),
                Message::new(
                    Role::User,
                    format!("Question number {i}: what is {i} plus {i}?"),
                ),
                Message::new(
                    Role::Assistant,
                    format!("The answer is {}. Let me know if you need more.", 2 * i),
                ),
                Message::new(Role::User, "Thanks! And times two?"),
                Message::new(Role::Assistant, format!("That would be {}.", 4 * i)),
            ])
        })
        .collect()
}

fn encode(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for arch in ["qwen3", "llama"] {
        let tok = ChatTokenizer::from_model_dir(&dir.join(arch)).unwrap();
        let convs = conversations(100);
        c.bench_function(
            &format!("encode 100 two-turn conversations ({arch} template)"),
            |b| {
                b.iter(|| {
                    convs
                        .iter()
                        .map(|c| tok.encode(c).unwrap().input_ids.len())
                        .sum::<usize>()
                });
            },
        );
    }
}

fn pack(c: &mut Criterion) {
    let lengths: Vec<usize> = (0..20_000).map(|i| 20 + (i * 7919) % 900).collect();
    c.bench_function("best-fit-decreasing 20k examples into 2048", |b| {
        b.iter(|| best_fit_decreasing(&lengths, 2048).len());
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = encode, pack
}
criterion_main!(benches);
