//! Handing memory back to the system, and asking it for huge pages.
//!
//! Encoding an image and prefilling its prompt allocate and free hundreds of megabytes
//! (pixels, ONNX Runtime's per-call working memory, which its arena frees after such calls).
//! glibc keeps freed blocks below its mmap threshold (which rises to 32 MB as large blocks
//! are freed) inside the process, so without a trim a long-running engine's resident size
//! drifts up by the fragments of every call. `Graph::run` trims after the last vision call
//! of an image and the last chunk of a prompt (the calls before reuse the same working
//! memory; trimming after each one cost ~10% of vision time in page faults).
//! Freed batch rows release their key/value pages the same way (`release_pages`).
//! Preprocessing asks for transparent huge pages for its large output buffers
//! (`prefer_huge_pages`): filling a fresh 37 MB tensor took ~9 ms in 4 KiB page faults, ~5 ms
//! with huge pages; a buffer reused through `recycle` takes no faults at all.

/// Asks the system to back `data` with transparent huge pages where it allows that (Linux
/// with THP in `madvise` or `always` mode): a freshly allocated output buffer of tens of
/// megabytes then takes a few dozen page faults instead of thousands. Call it before the
/// first write; contents never change.
pub(crate) fn prefer_huge_pages<T: Copy>(data: &mut [T]) {
    #[cfg(target_os = "linux")]
    // SAFETY: MADV_HUGEPAGE only changes how the kernel backs those pages, never their
    // contents.
    unsafe {
        advise_whole_pages(data, 2 << 20, libc::MADV_HUGEPAGE);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

/// `madvise(advice)` on the whole `page`-sized pages inside `data` (none when it spans
/// no whole page).
///
/// # Safety
/// `advice` must leave the memory valid for `T` (contents kept, or zero bytes where those
/// are a valid `T`).
#[cfg(target_os = "linux")]
unsafe fn advise_whole_pages<T>(data: &mut [T], page: usize, advice: libc::c_int) {
    let start = data.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(data);
    let (first, last) = (start.div_ceil(page) * page, end / page * page);
    if last > first {
        // SAFETY: [first, last) lies inside `data`, which the caller borrows exclusively;
        // what `advice` does to it is the caller's promise.
        unsafe {
            libc::madvise(first as *mut libc::c_void, last - first, advice);
        }
    }
}

/// Returns free heap pages to the system where the allocator allows it (glibc).
#[cfg_attr(not(feature = "inference"), allow(dead_code))]
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Gives the whole pages inside `data` back to the system; they read as zeros afterwards
/// (Linux: `MADV_DONTNEED` on private anonymous memory). Elsewhere, or for memory that is
/// not whole pages, the data is left as it is. Only for element types whose all-zero bytes
/// are a valid value (floats, integers).
#[cfg_attr(not(feature = "inference"), allow(dead_code))]
pub(crate) fn release_pages<T: Copy>(data: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf only reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
        if page == 0 {
            return;
        }
        // SAFETY: MADV_DONTNEED replaces those pages with zero-filled ones, a valid value for
        // the element types this is used with, and touches nothing outside them.
        unsafe {
            advise_whole_pages(data, page, libc::MADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_pages_read_as_zeros_and_nothing_else_changes() {
        let mut v = vec![1.5f32; 1 << 20];
        release_pages(&mut v[10..(1 << 20) - 10]);
        assert!(v[..10].iter().chain(&v[(1 << 20) - 10..]).all(|&x| x == 1.5));
        // Whole pages well inside the range are zero on Linux, untouched elsewhere.
        let middle = &v[1 << 19..(1 << 19) + 1024];
        if cfg!(target_os = "linux") {
            assert!(middle.iter().all(|&x| x == 0.0));
        } else {
            assert!(middle.iter().all(|&x| x == 1.5));
        }
        // Values between the range's ends and its page boundaries are kept or zeroed, never
        // anything else.
        assert!(v.iter().all(|&x| x == 0.0 || x == 1.5));
    }
}
