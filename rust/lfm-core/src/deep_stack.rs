//! A thread with a large stack, for work whose recursion depth follows its input: the
//! grammar compiler recurses once per level of rule or schema nesting, and a chat template
//! can build a value nested once per loop turn that printing or dropping recurses through.
//! On a thread's usual stack (8 MiB for a main thread, 2 MiB for others) such input
//! overflows it and kills the process instead of failing with an error.

/// Stack reserved for such work. Only the pages it touches are committed. Template fuel
/// (`chat::template`) bounds a render's nesting to ~500 000 levels at ~450 bytes each.
pub(crate) const STACK_BYTES: usize = 512 << 20;

/// Runs `f` on a thread named `name` with [`STACK_BYTES`] of stack and waits for it; a
/// panic in `f` continues on the calling thread.
pub(crate) fn run<T: Send>(name: &str, f: impl FnOnce() -> crate::Result<T> + Send) -> crate::Result<T> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(name.into())
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, f)
            .map_err(|e| crate::Error::Internal(format!("cannot start the {name} thread: {e}")))?;
        handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
