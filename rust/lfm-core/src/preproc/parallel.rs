//! Splitting an output buffer between threads. The work on each part is the same whatever
//! the split, so results never depend on the number of cores.

/// Runs `f(first_item, items)` over `out` cut into items of `item_len` values, in up to
/// four contiguous runs of whole items on as many cores, when `out` holds at least
/// `min_len` values and two items; otherwise in one call on this thread.
pub(super) fn par_items<T: Send>(out: &mut [T], item_len: usize, min_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let items = out.len() / item_len.max(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4).min(items);
    if threads <= 1 || out.len() < min_len {
        f(0, out);
        return;
    }
    let per = items.div_ceil(threads);
    std::thread::scope(|scope| {
        for (k, run) in out.chunks_mut(per * item_len).enumerate() {
            let f = &f;
            scope.spawn(move || f(k * per, run));
        }
    });
}
