//! The cheapest possible handler: acks every event without looking at it.
//! It exists to measure the host's per-event dispatch cost in isolation.
//!
//! It is `no_std` on purpose: Rust's `std` on wasm32-wasip2 makes every
//! component import a dozen `wasi:cli`/`wasi:io` interfaces (for panics
//! and stdio), and each import costs time at every instantiation. A
//! handler that needs none of them should not pay for them.

// The test harness (`clippy --all-targets`) brings std and its panic handler.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

use alloc::vec;

wit_bindgen::generate!({ world: "handler", path: "../../wit", generate_all, std_feature });

use event_host::handler::types::{ExchangeKind, Subscription};

/// A bump allocator over the free memory after the stack and static data
/// (from the linker's `__heap_base`). Everything a call allocates, the
/// call also frees, so once nothing is live the heap starts over: memory
/// stays at its initial size whether the host makes a fresh instance per
/// event or reuses one. Growing and resetting memory is what costs the host
/// time per instance, and dlmalloc alone would be most of this binary.
struct Bump;

const PAGE: usize = 64 * 1024;
// Single-threaded guest: nothing else touches these.
static mut NEXT: usize = 0;
static mut LIVE: usize = 0;

unsafe extern "C" {
    static __heap_base: u8;
}

unsafe impl core::alloc::GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        use core::arch::wasm32::{memory_grow, memory_size};
        unsafe {
            if LIVE == 0 {
                NEXT = core::ptr::addr_of!(__heap_base) as usize;
            }
            let start = NEXT.next_multiple_of(layout.align());
            let Some(end) = start.checked_add(layout.size()) else {
                return core::ptr::null_mut();
            };
            let pages = end.div_ceil(PAGE);
            if pages > memory_size(0) && memory_grow(0, pages - memory_size(0)) == usize::MAX {
                return core::ptr::null_mut();
            }
            NEXT = end;
            LIVE += 1;
            start as *mut u8
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: core::alloc::Layout) {
        unsafe { LIVE -= 1 }
    }
}

#[global_allocator]
static ALLOCATOR: Bump = Bump;

#[cfg(not(test))]
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
            publishes: vec![],
            max_attempts: None,
        }
    }

    fn handle(_event: Event) -> Result<(), HandleError> {
        Ok(())
    }
}

export!(Noop);
