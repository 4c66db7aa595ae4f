//! Byte buffers reused between file chunks, on either side of the wire:
//! frame bodies read from the peer (whose attachments go straight to a
//! file), chunks read from files, and their encodings. Reusing them spares
//! a large allocation, its page faults and its zeroing for every chunk; the
//! pool is process-wide, small, and holds only chunk-sized buffers, so
//! memory stays bounded whatever the file's size.

use std::sync::Mutex;

/// Buffers kept for reuse (enough for a pipeline of 4 chunks each way).
const POOL_BUFFERS: usize = 6;
/// Largest buffer kept (a 2 MiB chunk with its JSON text); larger ones go
/// back to the allocator.
const POOLED_MAX: usize = (2 << 20) + (64 << 10);

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer from the pool, or a new empty one. A pooled buffer keeps the
/// length and contents its last user left, so that a reader that needs
/// initialized bytes can resize it without zeroing it again; clear it when
/// appending.
pub fn take() -> Vec<u8> {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_default()
}

/// Make room in `buf` for `additional` more bytes without a fresh
/// allocation where the pool has a buffer: when `buf` must grow, its bytes
/// move into a pooled buffer (which then takes its place).
pub fn reserve_pooled(buf: &mut Vec<u8>, additional: usize) {
    if buf.capacity() - buf.len() >= additional {
        return;
    }
    let mut pooled = take();
    pooled.clear();
    pooled.reserve(buf.len() + additional);
    pooled.extend_from_slice(buf);
    *buf = pooled;
}

/// Give a buffer back for reuse; one over `max` bytes (and over the pool's
/// own bound) goes back to the allocator.
pub fn give(b: Vec<u8>, max: usize) {
    if b.capacity() == 0 || b.capacity() > max.min(POOLED_MAX) {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_BUFFERS {
        pool.push(b);
    }
}

/// Give back a buffer whatever its size up to the pool's bound.
pub fn recycle(b: Vec<u8>) {
    give(b, usize::MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_what_it_is_given_within_bounds() {
        // The pool is process-wide: only check what this test can see.
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(b"abc");
        let ptr = b.as_ptr();
        recycle(b);
        let again = take();
        if again.as_ptr() == ptr {
            assert!(again.capacity() >= 4096);
            assert_eq!(again, b"abc", "contents are kept");
        }
        // Too large for the pool: dropped, never kept.
        give(Vec::with_capacity(POOLED_MAX + 1), usize::MAX);
        give(Vec::with_capacity(8192), 4096);
        let pool = POOL.lock().unwrap();
        assert!(pool.iter().all(|b| b.capacity() <= POOLED_MAX));
        assert!(pool.len() <= POOL_BUFFERS);
    }

    #[test]
    fn reserve_pooled_keeps_the_bytes_and_makes_the_room() {
        let mut b = b"head".to_vec();
        reserve_pooled(&mut b, 100_000);
        assert_eq!(b, b"head");
        assert!(b.capacity() - b.len() >= 100_000);
        // Enough room already: the same buffer stays.
        let ptr = b.as_ptr();
        reserve_pooled(&mut b, 10);
        assert_eq!(b.as_ptr(), ptr);
    }
}
