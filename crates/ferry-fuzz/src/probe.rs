//! The largest single allocation a piece of code asks for, measured by a global allocator
//! that wraps the system's: how a fuzz run proves that a length field claiming gigabytes
//! allocates nothing.
//!
//! Only a binary that installs [`LargestAllocation`] as its `#[global_allocator]` measures
//! anything; elsewhere [`measure`] reports `None`.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

thread_local! {
    /// The largest request made on this thread since the last reset.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting the size of every request made on each thread.
pub struct LargestAllocation;

fn note(size: usize) {
    // `try_with`: a thread being torn down still allocates after its locals are gone.
    let _ = LARGEST.try_with(|largest| {
        if size > largest.get() {
            largest.set(size);
        }
    });
}

// SAFETY: every call is passed unchanged to `System`, which upholds the contract; noting the
// size touches only a const-initialised thread local, which never allocates.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's layout is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's pointer, layout and size are passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result with the largest single allocation it made on this
/// thread, or `None` when [`LargestAllocation`] is not the process's allocator.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Option<usize>) {
    LARGEST.with(|largest| largest.set(0));
    // A one-byte allocation that only the probe can see tells whether it is installed.
    drop(std::hint::black_box(Box::new(0u8)));
    let installed = LARGEST.with(Cell::get) > 0;
    LARGEST.with(|largest| largest.set(0));
    let out = f();
    (out, installed.then(|| LARGEST.with(Cell::get)))
}
