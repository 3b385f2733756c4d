//! The global allocator: the first [`ARENA_LEN`] bytes a process allocates come from a
//! static arena, bumped and never reused; everything after, from the system's
//! allocator. A fresh hit allocates a few dozen small blocks and the result's bytes,
//! and exits: from the arena it maps nothing. The system allocator of the static
//! build (zig's musl) mapped and trimmed a 124 KiB region for each new size class,
//! ten `mmap`/`munmap` pairs per hit (see docs/benchmarks.md). A long-lived call
//! (a run, a service) spends the arena once, in its first moments, and is then on
//! the system's allocator as before: the arena costs at most its size, once.
//!
//! Its four methods are never inlined: every allocation site of the program calls
//! them, and inlined at each (as LTO does) they added 215 KB of text.
//!
//! The arena is in `.bss`: its pages cost nothing until touched, and are zero when
//! first handed out (never reused), so a zeroed allocation from it is free.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The arena's size: room for a hit of a result up to about 200 KiB.
pub const ARENA_LEN: usize = 256 * 1024;

#[repr(C, align(4096))]
struct Bytes(UnsafeCell<[u8; ARENA_LEN]>);

// SAFETY: every byte of the arena is handed out to one allocation at most (the bump
// pointer only moves forward, by compare-and-swap), so no two owners share one.
unsafe impl Sync for Bytes {}

static BYTES: Bytes = Bytes(UnsafeCell::new([0; ARENA_LEN]));
/// The offset of the arena's first free byte.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The allocator: the arena first, then [`System`].
pub struct Arena;

impl Arena {
    fn base() -> *mut u8 {
        BYTES.0.get().cast()
    }

    /// Whether `ptr` is in the arena (then it is never freed).
    fn holds(ptr: *mut u8) -> bool {
        let at = (ptr as usize).wrapping_sub(Self::base() as usize);
        at < ARENA_LEN
    }

    /// Bumps `NEXT` for `layout`; null when the arena has no room left.
    fn bump(layout: Layout) -> *mut u8 {
        let base = Self::base() as usize;
        let mut next = NEXT.load(Relaxed);
        loop {
            // Aligned as an address: the arena is page-aligned, so the offset is too.
            let Some(start) = (base + next).checked_next_multiple_of(layout.align()) else {
                return std::ptr::null_mut();
            };
            let start = start - base;
            let end = match start.checked_add(layout.size()) {
                Some(end) if end <= ARENA_LEN => end,
                _ => return std::ptr::null_mut(),
            };
            match NEXT.compare_exchange_weak(next, end, Relaxed, Relaxed) {
                // SAFETY: start < ARENA_LEN, within the arena.
                Ok(_) => return unsafe { Self::base().add(start) },
                Err(now) => next = now,
            }
        }
    }
}

// SAFETY: an arena block is `layout.size()` bytes aligned to `layout.align()`, owned by
// one allocation (see `Bytes`); everything else is the system allocator's.
unsafe impl GlobalAlloc for Arena {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = Self::bump(layout);
        if ptr.is_null() {
            // SAFETY: the caller's layout, as given.
            unsafe { System.alloc(layout) }
        } else {
            ptr
        }
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = Self::bump(layout);
        if ptr.is_null() {
            // SAFETY: the caller's layout, as given.
            unsafe { System.alloc_zeroed(layout) }
        } else {
            // Never handed out before: still the zeros of `.bss`.
            ptr
        }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !Self::holds(ptr) {
            // SAFETY: a block of the system allocator, with its layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !Self::holds(ptr) {
            // SAFETY: a block of the system allocator, as the caller gives it.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // The last block handed out grows (or shrinks) in place while there is room.
        let start = ptr as usize - Self::base() as usize;
        let end = start + layout.size();
        if let Some(new_end) = start.checked_add(new_size)
            && new_end <= ARENA_LEN
            && NEXT
                .compare_exchange(end, new_end, Relaxed, Relaxed)
                .is_ok()
        {
            return ptr;
        }
        if new_size <= layout.size() {
            return ptr;
        }
        // SAFETY: the caller guarantees a valid size for this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as `alloc`.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks hold at least `layout.size()` bytes and are distinct.
            unsafe { std::ptr::copy_nonoverlapping(ptr, new, layout.size()) };
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_distinct_and_zeroed() {
        let arena = Arena;
        let mut blocks = Vec::new();
        for (size, align) in [(1, 1), (24, 8), (100, 16), (4096, 4096), (3, 2)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a non-zero layout; freed below.
            let ptr = unsafe { arena.alloc_zeroed(layout) };
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % align, 0);
            // SAFETY: `size` bytes of it are ours.
            let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, size) };
            assert!(bytes.iter().all(|&b| b == 0));
            bytes.fill(0xa5);
            blocks.push((ptr, layout));
        }
        for (ptr, layout) in &blocks {
            // SAFETY: just filled.
            let bytes = unsafe { std::slice::from_raw_parts(*ptr, layout.size()) };
            assert!(bytes.iter().all(|&b| b == 0xa5), "a block was overwritten");
        }
        // Grown by realloc, in place or moved, it keeps its bytes.
        let (ptr, layout) = blocks[1];
        // SAFETY: a block of this allocator with its layout.
        let grown = unsafe { arena.realloc(ptr, layout, 10_000) };
        // SAFETY: at least the old size is kept.
        let bytes = unsafe { std::slice::from_raw_parts(grown, layout.size()) };
        assert!(bytes.iter().all(|&b| b == 0xa5));
        for (ptr, layout) in blocks {
            // SAFETY: as allocated (the grown one's old block is no longer used).
            unsafe { arena.dealloc(ptr, layout) };
        }
        // More than the arena holds comes from the system allocator.
        let big = Layout::from_size_align(ARENA_LEN + 1, 8).unwrap();
        // SAFETY: a non-zero layout; freed at once.
        unsafe {
            let ptr = arena.alloc(big);
            assert!(!ptr.is_null() && !Arena::holds(ptr));
            arena.dealloc(ptr, big);
        }
    }
}
