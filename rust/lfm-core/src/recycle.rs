//! Large buffers kept for reuse. A fresh allocation of tens of megabytes comes from the
//! system as untouched pages, and the first write to each one is a page fault (a 1920x1080
//! image's pixel tensor is 35 MB: ~4,800 faults and more kernel time than the arithmetic
//! that fills it). Preprocessing takes its output tensors and image copies from here, and
//! whoever is done with one may give it back; a few recent buffers are kept, bounded in
//! bytes, so a process that stops preprocessing holds at most that much.

use std::sync::{Mutex, PoisonError};

use crate::heap::prefer_huge_pages;

/// Bytes kept per element type.
const KEEP_BYTES: usize = 80 << 20;
/// Buffers kept per element type.
const KEEP_BUFFERS: usize = 4;

/// Element types with a pool of their own.
pub trait Recyclable: Copy + Default + Send + 'static {
    #[doc(hidden)]
    fn pool() -> &'static Pool<Self>;
}

/// Freed buffers of one element type, oldest first.
#[doc(hidden)]
pub struct Pool<T> {
    free: Mutex<Vec<Vec<T>>>,
}

impl<T> Pool<T> {
    const fn new() -> Self {
        Pool { free: Mutex::new(Vec::new()) }
    }
}

impl Recyclable for f32 {
    fn pool() -> &'static Pool<f32> {
        static POOL: Pool<f32> = Pool::new();
        &POOL
    }
}

impl Recyclable for u8 {
    fn pool() -> &'static Pool<u8> {
        static POOL: Pool<u8> = Pool::new();
        &POOL
    }
}

/// A buffer of `len` values whose contents are unspecified (a kept buffer's old values, or
/// zeros): the caller overwrites all of it.
pub fn take<T: Recyclable>(len: usize) -> Vec<T> {
    let kept = {
        let mut free = T::pool().free.lock().unwrap_or_else(PoisonError::into_inner);
        // The smallest kept buffer that holds `len` values.
        let best = free.iter().enumerate().filter(|(_, v)| v.capacity() >= len).min_by_key(|(_, v)| v.capacity());
        best.map(|(i, _)| i).map(|i| free.remove(i))
    };
    match kept {
        Some(mut v) => {
            v.resize(len, T::default());
            v
        }
        None => {
            let mut v = vec![T::default(); len];
            prefer_huge_pages(&mut v);
            v
        }
    }
}

/// Keeps `v` for a later [`take`], dropping the oldest kept buffers beyond the limits.
pub fn give<T: Recyclable>(v: Vec<T>) {
    let bytes = |v: &Vec<T>| v.capacity() * std::mem::size_of::<T>();
    if bytes(&v) == 0 || bytes(&v) > KEEP_BYTES {
        return;
    }
    let mut free = T::pool().free.lock().unwrap_or_else(PoisonError::into_inner);
    free.push(v);
    while free.len() > KEEP_BUFFERS || free.iter().map(bytes).sum::<usize>() > KEEP_BYTES {
        free.remove(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test touches the pools (tests run in parallel threads of one process).
    #[test]
    fn buffers_come_back_within_the_limits() {
        give(vec![7u8; 1000]);
        let v: Vec<u8> = take(600);
        assert_eq!(v.len(), 600);
        assert!(v.capacity() >= 1000, "the kept buffer is reused");
        give(v);
        let bigger: Vec<u8> = take(5000);
        assert_eq!((bigger.len(), bigger.iter().all(|&b| b == 0)), (5000, true), "nothing kept fits: a fresh one");
        for _ in 0..KEEP_BUFFERS + 3 {
            give(vec![1u8; 10]);
        }
        give(vec![0u8; KEEP_BYTES + 1]);
        let free = u8::pool().free.lock().unwrap();
        assert_eq!(free.len(), KEEP_BUFFERS, "the oldest are dropped; too large ones never kept");
        assert!(free.iter().all(|v| v.capacity() < 1000));
    }
}
