//! The process's allocator ([`mimalloc`], chosen in the crate root) and giving freed memory back
//! to the OS when a process goes quiet.
//!
//! mimalloc returns freed pages to the OS ("purges" them) lazily: a page freed now is purged about
//! 100 ms later, but only when the allocator is next busy (a thread frees a whole page, or makes
//! many allocations). A process that goes idle after a burst never gets there: a ws-gateway whose
//! 10,000 WebSockets had closed held on to 90 MB it no longer used, 70 MB above where it started
//! (docs/performance.md, "Idle WebSockets"). [`purge_when_idle`] starts one thread that runs that
//! overdue purge once a second. It purges only what mimalloc has already scheduled, so a busy
//! process purges no more often than before.

use std::sync::Once;
use std::time::Duration;

/// How often the purge thread looks for freed memory whose delay has passed.
pub const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Starts, once per process, the thread that returns freed memory to the OS (see the module docs).
/// Every long-running binary calls this at start.
pub fn purge_when_idle() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("fleet-purge".into())
            .stack_size(64 * 1024)
            .spawn(|| {
                // mi_collect works on the calling thread's heap, which exists only once the thread
                // has allocated; the purge of freed pages it then runs is process-wide.
                std::hint::black_box(Box::new(0u64));
                loop {
                    std::thread::sleep(PURGE_EVERY);
                    collect();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start the memory purge thread; memory freed after a burst stays with the allocator");
        }
    });
}

/// Runs mimalloc's collection of this thread's heap and its process-wide purge of pages whose
/// delay has passed (`mi_collect(false)`: nothing is forced).
#[allow(unsafe_code)]
fn collect() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time; it only
    // touches the allocator's own state, under the allocator's own synchronisation.
    unsafe { libmimalloc_sys::mi_collect(false) }
}
