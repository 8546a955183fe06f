//! Safetensors files: header, offsets, shapes and dtypes are validated against the file size
//! before any tensor is touched; reading every tensor of an accepted file must then work.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use train_model::SafetensorsFile;

fuzz_target!(|data: &[u8]| {
    let Some(path) = common::scratch("model.safetensors", data) else {
        return;
    };
    let Ok(file) = SafetensorsFile::open(&path) else {
        return;
    };
    let names: Vec<String> = file.entries().map(|(n, _)| n.to_string()).collect();
    for name in names {
        assert!(file.bytes(&name).is_some(), "an accepted tensor has no bytes");
    }
});
