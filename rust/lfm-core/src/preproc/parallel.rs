//! How many threads preprocessing uses. The work each unit does is the same whatever the
//! split, so results never depend on the number of cores.

/// Threads for `units` units of work: one per core, at most four (the pixel pipeline is
/// bound by memory beyond that), at most one per unit.
pub(super) fn work_threads(units: usize) -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4).min(units).max(1)
}
