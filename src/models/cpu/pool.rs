//! Reused activation buffers. A fresh multi-megabyte `Vec` is a fresh `mmap`: the kernel zeroes
//! every page on first touch, which cost more than a quarter of a MobileNet-sized forward pass
//! at batch 32 (measured with `perf`). The plan's ops take their outputs and scratch from here
//! and give them back when done, as PyTorch's CPU caching allocator does.

use std::sync::Mutex;

/// Bytes the pool keeps at most; past it, [`give`] frees the buffers given back longest ago.
const MAX_POOLED_BYTES: usize = 1 << 27;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` values. Its contents are whatever the last user left (or zeros when new):
/// callers overwrite every element.
pub fn take(len: usize) -> Vec<f32> {
    let reused = POOL.lock().ok().and_then(|mut pool| {
        // The smallest buffer that fits, so that big ones stay for big requests.
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)?;
        Some(pool.remove(best))
    });
    match reused {
        Some(mut buffer) => {
            if buffer.len() >= len {
                buffer.truncate(len);
            } else {
                buffer.resize(len, 0.0);
            }
            buffer
        }
        None => vec![0.0; len],
    }
}

/// Returns a buffer for reuse. Past the cap, the buffers given back longest ago are freed: the
/// pool follows the network now running, not the one before it (whose buffers, all of the
/// wrong sizes, would otherwise fill it for good).
pub fn give(buffer: Vec<f32>) {
    if buffer.capacity() < 1024 || buffer.capacity() * 4 > MAX_POOLED_BYTES {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        pool.push(buffer);
        let mut pooled: usize = pool.iter().map(|b| b.capacity() * 4).sum();
        while pooled > MAX_POOLED_BYTES {
            pooled -= pool.remove(0).capacity() * 4;
        }
    }
}
