//! The process's allocator: mimalloc, asked the way the system allocator is.
//!
//! Lua's allocations reach Rust's allocator with mlua's 16-byte alignment.
//! mimalloc's own `GlobalAlloc` sends every request through its aligned entry
//! point, whose fast path takes a block only when its page's free list is
//! non-empty and the block happens to be aligned; otherwise it over-allocates
//! (a larger size class, for any block size that is not a power of two). That
//! was about a third of a request's allocations. A plain `mi_malloc` already
//! returns blocks aligned to 16 bytes for every size of at least 16 (and to 8
//! below), as the C standard requires of `malloc`; so, like Rust's own
//! `System` allocator over `malloc`, requests whose alignment that covers go
//! to the plain entry points.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every `mi_malloc` block of at least this size has
/// (`MI_MAX_ALIGN_SIZE`, `max_align_t` on 64-bit targets).
const PLAIN_ALIGN: usize = 16;

pub struct Allocator;

/// Whether a plain allocation of `size` bytes is aligned enough for `align`.
fn plain(align: usize, size: usize) -> bool {
    align <= PLAIN_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to `mi_free`; a plain
// entry point is used only where its alignment guarantee covers the layout.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe {
            if plain(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_blocks_have_the_alignment_the_layout_asks_for() {
        let allocator = Allocator;
        let mut blocks = Vec::new();
        for size in 1..=2048usize {
            for align in [1, 2, 4, 8, 16, 32, 64] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: a non-zero layout, freed below with the same layout.
                let block = unsafe { allocator.alloc(layout) };
                assert!(!block.is_null());
                assert_eq!(block as usize % align, 0, "size {size}, align {align}");
                blocks.push((block, layout));
            }
        }
        for (block, layout) in blocks {
            // SAFETY: allocated above with this layout.
            unsafe { allocator.dealloc(block, layout) };
        }
    }

    #[test]
    fn reallocation_keeps_the_contents_and_the_alignment() {
        let allocator = Allocator;
        let layout = Layout::from_size_align(24, 16).unwrap();
        // SAFETY: a non-zero layout; every pointer is the last one returned.
        unsafe {
            let mut block = allocator.alloc_zeroed(layout);
            assert_eq!(std::slice::from_raw_parts(block, 24), [0; 24]);
            block.write_bytes(7, 24);
            let mut size = 24;
            for new_size in [40, 1000, 100_000, 17, 48] {
                block = allocator.realloc(block, Layout::from_size_align(size, 16).unwrap(), new_size);
                assert_eq!(block as usize % 16, 0, "{new_size}");
                assert!(std::slice::from_raw_parts(block, size.min(new_size)).iter().all(|&b| b == 7));
                block.write_bytes(7, new_size);
                size = new_size;
            }
            allocator.dealloc(block, Layout::from_size_align(size, 16).unwrap());
        }
    }
}
