//! The data loader and validator on arbitrary files: JSONL, JSON arrays and Parquet (the first
//! byte picks the container), every row schema, strict and skipping policies; the preference
//! pair loader on the same files.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use train_data::{
    DataFormat, ErrorPolicy, LoadOptions, RowSchema, check_file, load_conversations,
    load_preferences,
};

fuzz_target!(|data: &[u8]| {
    // The loader catches panics of polars' Parquet decoder and reports the file as unreadable.
    // libfuzzer-sys installs a hook that aborts on every panic, caught or not; keep a silent
    // one instead: a panic that escapes the loader still reaches libfuzzer-sys's own
    // catch_unwind, which aborts, so real crashes are still found.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let (name, format) = match selector % 3 {
        0 => ("rows.jsonl", DataFormat::Jsonl),
        1 => ("rows.json", DataFormat::Json),
        _ => ("rows.parquet", DataFormat::Parquet),
    };
    let schema = match (selector / 3) % 4 {
        0 => RowSchema::Auto,
        1 => RowSchema::Messages,
        2 => RowSchema::Alpaca,
        _ => RowSchema::ShareGpt,
    };
    let Some(path) = common::scratch(name, body) else {
        return;
    };
    for policy in [ErrorPolicy::Strict, ErrorPolicy::Skip] {
        let options = LoadOptions { format, schema, policy };
        let _ = load_conversations(&path, &options);
        let _ = load_preferences(&path, &options);
    }
    let _ = check_file(&path, &LoadOptions { format, schema, policy: ErrorPolicy::Skip }, None);
});
