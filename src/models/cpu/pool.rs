//! Reused activation buffers. A fresh multi-megabyte `Vec` is a fresh `mmap`: the kernel zeroes
//! every page on first touch, which cost more than a quarter of a MobileNet-sized forward pass
//! at batch 32 (measured with `perf`). The plan's ops take their outputs and scratch from here
//! and give them back when dropped, as PyTorch's CPU caching allocator does.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// Bytes the pool keeps at most; past it, the buffers given back longest ago are freed.
const MAX_POOLED_BYTES: usize = 1 << 27;

/// Pooled storage, each at its full initialised length (a shorter [`Buffer`] over it does not
/// shorten it: growing it again would mean zeroing it again, 8% of a forward pass).
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// `len` values over pooled storage, which goes back to the pool when the buffer is dropped.
/// Its contents are whatever the last user left (or zeros when new): callers overwrite every
/// element.
#[derive(Debug, Clone)]
pub struct Buffer {
    storage: Vec<f32>,
    len: usize,
}

impl Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.storage[..self.len]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.storage[..self.len]
    }
}

impl PartialEq for Buffer {
    fn eq(&self, other: &Buffer) -> bool {
        **self == **other
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.storage));
    }
}

/// A buffer of `len` values.
pub fn take(len: usize) -> Buffer {
    let reused = POOL.lock().ok().and_then(|mut pool| {
        // The smallest storage long enough, else the smallest with room enough (grown once),
        // so that big ones stay for big requests.
        let smallest = |fits: &dyn Fn(&Vec<f32>) -> bool| {
            pool.iter()
                .enumerate()
                .filter(|(_, b)| fits(b))
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i)
        };
        let best = smallest(&|b| b.len() >= len).or_else(|| smallest(&|b| b.capacity() >= len))?;
        Some(pool.remove(best))
    });
    let mut storage = reused.unwrap_or_default();
    if storage.len() < len {
        storage.resize(len, 0.0);
    }
    Buffer { storage, len }
}

/// Keeps `storage` for reuse; past the cap, the storage given back longest ago is freed: the
/// pool follows the network now running, not the one before it (whose buffers, all of the
/// wrong sizes, would otherwise fill it for good).
fn give(storage: Vec<f32>) {
    if storage.len() < 1024 || storage.capacity() * 4 > MAX_POOLED_BYTES {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        pool.push(storage);
        let mut pooled: usize = pool.iter().map(|b| b.capacity() * 4).sum();
        while pooled > MAX_POOLED_BYTES {
            pooled -= pool.remove(0).capacity() * 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shorter_buffer_leaves_its_storage_whole() {
        let mut a = take(4096);
        a.fill(1.0);
        let (ptr, whole) = (a.as_ptr(), a.storage.len());
        drop(a);
        let b = take(2048);
        assert_eq!(b.len(), 2048);
        // Another test may have taken it first; when this one got it, it is still as long.
        if b.as_ptr() == ptr {
            assert_eq!(b.storage.len(), whole);
        }
    }
}
