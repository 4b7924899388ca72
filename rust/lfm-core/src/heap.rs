//! Handing freed heap memory back to the system.
//!
//! Encoding an image and prefilling its prompt allocate and free hundreds of megabytes
//! (pixels, ONNX Runtime's per-call working memory). glibc keeps freed blocks below its
//! mmap threshold (which rises to 32 MB as large blocks are freed) in the process, so a
//! long-running engine's resident size drifts up to the sum of past peaks. The scheduler
//! calls this once per admitted request, which costs well under a millisecond next to
//! the seconds the request's vision and prefill take.

/// Returns free heap pages to the system where the allocator allows it (glibc).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}
