//! Untrusted chat templates rendered over untrusted messages: errors are fine, panics, hangs,
//! stack overflows and unbounded memory are not (fuel, recursion limit, the engine's memory
//! budget and value-nesting bound, output bound).
#![no_main]

use libfuzzer_sys::fuzz_target;
use train_data::{ChatTemplate, Message, Role};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // "template\0content of the user turn\0content of the answer"
    let mut parts = text.splitn(3, '\0');
    let source = parts.next().unwrap_or_default();
    let user = parts.next().unwrap_or("Hello");
    let answer = parts.next().unwrap_or("Hi!");
    let Ok(template) = ChatTemplate::new(source, "fuzz.jinja") else {
        return;
    };
    let messages = [
        Message::new(Role::System, "You are terse."),
        Message::new(Role::User, user),
        Message::new(Role::Assistant, answer),
    ];
    for add_generation_prompt in [false, true] {
        if let Ok(out) = template.render(&messages, add_generation_prompt) {
            assert!(out.len() <= train_data::MAX_RENDERED_BYTES);
        }
    }
});
