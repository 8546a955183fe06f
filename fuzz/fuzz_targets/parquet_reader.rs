//! Untrusted Parquet files through both readers of this crate: conversation rows
//! (`load_conversations`) and tokenized examples (`read_examples`, the data cache). Errors are
//! fine; panics that escape, aborts and decompression bombs are not (both readers check what the
//! footer and every page header declare against a decoding limit before decoding).
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use train_data::{DataFormat, ErrorPolicy, LoadOptions, load_conversations};

fuzz_target!(|data: &[u8]| {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some(path) = common::scratch("rows.parquet", data) else {
        return;
    };
    let options = LoadOptions {
        format: DataFormat::Parquet,
        policy: ErrorPolicy::Skip,
        ..LoadOptions::default()
    };
    let _ = load_conversations(&path, &options);
    if let Ok(examples) = train_data::read_examples(&path) {
        for e in &examples {
            assert_eq!(e.input_ids.len(), e.labels.len());
            assert!(!e.input_ids.is_empty());
        }
    }
});
