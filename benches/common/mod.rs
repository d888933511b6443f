//! Shared by the benches: deterministic network inputs.

/// `len` values in the networks' normalised range [-1, 1), from a fixed xorshift sequence.
pub fn inputs(len: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 256) as f32 / 128.0 - 1.0
        })
        .collect()
}
