//! The cheapest possible handler: acks every event without looking at it.
//! It exists to measure the host's per-event dispatch cost in isolation.
//!
//! It is `no_std` on purpose: Rust's `std` on wasm32-wasip2 makes every
//! component import a dozen `wasi:cli`/`wasi:io` interfaces (for panics
//! and stdio), and each import costs time at every instantiation. A
//! handler that needs none of them should not pay for them.

#![no_std]

extern crate alloc;

use alloc::vec;

wit_bindgen::generate!({ world: "handler", path: "../../wit", generate_all, std_feature });

use event_host::handler::types::{ExchangeKind, Subscription};

/// Allocations come from a small static arena first: it lives in the
/// initial memory image, so an event never has to grow memory (growing and
/// shrinking back costs the host two `mprotect`s per event). Arena blocks
/// are never reused — each event gets a fresh instance — and anything past
/// the arena falls back to dlmalloc.
struct Arena;

const ARENA_SIZE: usize = 16 * 1024;
static mut ARENA: [u8; ARENA_SIZE] = [0; ARENA_SIZE];
static mut ARENA_USED: usize = 0;

unsafe impl core::alloc::GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        // Single-threaded guest: no concurrent access to the arena.
        unsafe {
            let base = core::ptr::addr_of_mut!(ARENA) as usize;
            let start = (base + ARENA_USED).next_multiple_of(layout.align());
            let end = start + layout.size();
            if end <= base + ARENA_SIZE {
                ARENA_USED = end - base;
                return start as *mut u8;
            }
            core::alloc::GlobalAlloc::alloc(&dlmalloc::GlobalDlmalloc, layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: core::alloc::Layout) {
        let base = core::ptr::addr_of_mut!(ARENA) as usize;
        if !(base..base + ARENA_SIZE).contains(&(ptr as usize)) {
            unsafe { core::alloc::GlobalAlloc::dealloc(&dlmalloc::GlobalDlmalloc, ptr, layout) }
        }
    }
}

#[global_allocator]
static ALLOCATOR: Arena = Arena;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator entry point. wit-bindgen's own copy is
/// only linked in through `std`, so a `no_std` guest provides it.
///
/// # Safety
/// Called by the host per the component model's canonical ABI only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{alloc, realloc, Layout};
    if new_len == 0 {
        return align as *mut u8;
    }
    let ptr = unsafe {
        if old_len == 0 {
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}

struct Noop;

impl Guest for Noop {
    fn manifest() -> Manifest {
        Manifest {
            name: "noop".into(),
            version: "1.0.0".into(),
            subscriptions: vec![Subscription {
                exchange: "bench".into(),
                kind: ExchangeKind::Fanout,
                binding_keys: vec![],
            }],
            max_attempts: None,
        }
    }

    fn handle(_event: Event) -> Result<(), HandleError> {
        Ok(())
    }
}

export!(Noop);
