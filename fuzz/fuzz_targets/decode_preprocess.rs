//! Untrusted bytes -> decode (with limits) -> ImageSchema row -> RGB -> network input.
//! Every step must return an error, never panic, hang or allocate past the limits.
#![no_main]

use std::sync::OnceLock;

use deep_pipelines::image::{DecodeLimits, decode_image, to_rgb8};
use deep_pipelines::models::{Manifest, manifest};
use deep_pipelines::preprocess::preprocess;
use libfuzzer_sys::fuzz_target;

fn bundled() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| manifest("EfficientNetLite0").expect("bundled manifest").0)
}

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits {
        max_side: 4096,
        max_decoded_bytes: 64 * 1024 * 1024,
    };
    let Ok(row) = decode_image(data, "fuzz", &limits) else {
        return;
    };
    assert_eq!(
        row.data.len(),
        (row.width * row.height * row.channels) as usize,
        "decoded size disagrees with the row's fields"
    );
    if let Ok(rgb) = to_rgb8(
        row.height as i32,
        row.width as i32,
        row.channels as i32,
        row.mode,
        &row.data,
    ) {
        let _ = preprocess(&rgb, bundled());
    }
});
