//! Counting allocations: the suite's global allocator is the system's,
//! counting each allocation (and reallocation) made by the thread that
//! makes it, and the bytes that thread holds, so a test can hold a code
//! path to an allocation budget or a memory bound.
//!
//! Per thread, not global: the suite runs tests in parallel, and a
//! current-thread runtime polls everything a test awaits on the test's own
//! thread.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting.
pub struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    /// Bytes allocated by this thread and not yet freed by it (a block
    /// freed by another thread stays counted here).
    static HELD: Cell<i64> = const { Cell::new(0) };
    /// The most `HELD` has been since the last [`reset_peak`].
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn note() {
    // During thread teardown the counter may be gone: nothing to count.
    let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
}

fn hold(bytes: i64) {
    let _ = HELD.try_with(|held| {
        let now = held.get() + bytes;
        held.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn size(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

// SAFETY: every call is passed unchanged to `System`, which upholds the
// `GlobalAlloc` contract; counting touches only a `const` thread-local
// `Cell`, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        hold(size(layout.size()));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        hold(size(layout.size()));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        hold(size(new_size) - size(layout.size()));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        hold(-size(layout.size()));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Allocations this thread has made so far.
pub fn so_far() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Starts a new peak: from now on [`peak_growth`] measures from the bytes
/// this thread holds at this moment.
pub fn reset_peak() -> i64 {
    let held = HELD.with(Cell::get);
    PEAK.with(|peak| peak.set(held));
    held
}

/// The most bytes this thread has held since [`reset_peak`] returned
/// `baseline`, over that baseline.
pub fn peak_growth(baseline: i64) -> i64 {
    PEAK.with(Cell::get) - baseline
}
