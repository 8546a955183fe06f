//! The TOML run configuration: trainer and dataset settings, `[[transform]]` and
//! `[[processors]]` tables, alert thresholds — parsed, validated and built.
#![no_main]

use libfuzzer_sys::fuzz_target;
use train_data::{DatasetConfig, TransformRegistry};
use train_logits::{ProcessorContext, ProcessorsFile, build_processors};
use train_monitor::AlertConfig;
use train_runner::TrainerConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = toml::from_str::<TrainerConfig>(text) {
        let _ = c.validate();
    }
    if let Ok(c) = toml::from_str::<DatasetConfig>(text) {
        let _ = c.validate();
        let _ = c.transform_configs();
    }
    let _ = TransformRegistry::new().pipeline_from_toml(text);
    if let Ok(file) = ProcessorsFile::from_toml(text, "fuzz.toml".as_ref()) {
        let ctx = ProcessorContext { tokenizer: None, end_ids: &[0, 1] };
        let _ = build_processors(&file.processors, &ctx);
    }
    let _ = toml::from_str::<AlertConfig>(text);
});
