//! Untrusted safetensors bytes -> the EfficientNet-Lite0 loader. Must return an error, never
//! panic or allocate what the header claims before checking it.
#![no_main]

use std::sync::OnceLock;

use burn::prelude::Device;
use deep_pipelines::models::efficientnet_lite::{
    EfficientNetLite, EfficientNetLiteConfig, WEIGHT_NAME_MAP,
};
use deep_pipelines::models::load_safetensors_bytes;
use libfuzzer_sys::fuzz_target;

fn network() -> &'static EfficientNetLite {
    static NET: OnceLock<EfficientNetLite> = OnceLock::new();
    NET.get_or_init(|| EfficientNetLiteConfig::lite0().init(&Device::flex()))
}

fuzz_target!(|data: &[u8]| {
    let mut net = network().clone();
    let _ = load_safetensors_bytes(&mut net, data.to_vec(), "fuzz", WEIGHT_NAME_MAP, "fuzz");
});
