//! `config.json` parsing and checking, then the tensor table the checked configuration implies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use train_model::{ModelConfig, tensor_specs};

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(config) = ModelConfig::from_json("config.json".as_ref(), &json) {
        let specs = tensor_specs(&config);
        assert!(!specs.is_empty());
        let _ = config.num_parameters();
    }
});
