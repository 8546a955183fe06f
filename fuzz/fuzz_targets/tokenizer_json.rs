//! Untrusted `tokenizer.json` files loaded as a model directory's tokenizer and used on a short
//! conversation: errors are fine; panics that escape, aborts, hangs and unbounded allocations
//! are not (the loader bounds the file, the vocabulary, the added tokens and the text growth of
//! the normalizers, clears truncation and padding, and turns the crate's panics into errors).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use train_data::{ChatTokenizer, Conversation, Message, Role};

const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fuzz_target!(|data: &[u8]| {
    // The loader catches panics of the tokenizers crate; keep libfuzzer-sys's aborting hook
    // off so that only panics escaping the loader (reaching libfuzzer-sys) are crashes.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some(path) = common::scratch("tokenizer.json", data) else {
        return;
    };
    let Some(dir) = path.parent() else {
        return;
    };
    if common::scratch("chat_template.jinja", TEMPLATE.as_bytes()).is_none() {
        return;
    }
    let Ok(tok) = ChatTokenizer::from_model_dir(dir) else {
        return;
    };
    let conv = Conversation::new(vec![
        Message::new(Role::User, "Hello there, what's 2 + 2?"),
        Message::new(Role::Assistant, "It is 4. Ünïcödé ﷺ 東京"),
    ]);
    if let Ok(enc) = tok.encode(&conv) {
        assert_eq!(enc.input_ids.len(), enc.labels.len());
        assert!(
            enc.input_ids
                .iter()
                .all(|&id| (id as usize) < tok.vocab_size())
        );
    }
});
