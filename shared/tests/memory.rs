//! Memory a process freed goes back to the OS even when nothing allocates afterwards: the case of a
//! ws-gateway whose connections all closed, or any binary after a burst.

use std::sync::mpsc;
use std::time::{Duration, Instant};

const BLOCKS: usize = 200_000;
const BLOCK: usize = 512;

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("resident pages in /proc/self/statm");
    pages * 4096
}

#[test]
fn memory_freed_before_the_process_goes_idle_returns_to_the_os() {
    let start = rss();
    let (freed_tx, freed_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    // Like a connection task: many small buffers, all dropped, then the thread sits idle.
    let worker = std::thread::spawn(move || {
        let blocks: Vec<Box<[u8; BLOCK]>> =
            (0..BLOCKS).map(|i| Box::new([i as u8; BLOCK])).collect();
        let held = rss();
        drop(std::hint::black_box(blocks));
        freed_tx.send(held).unwrap();
        let _ = stop_rx.recv();
    });
    let held = freed_rx.recv().unwrap();
    let allocated = (BLOCKS * BLOCK) as u64;
    assert!(
        held >= start + allocated * 9 / 10,
        "the blocks were resident: {start} B at start, {held} B holding {allocated} B"
    );

    fleet::memory::purge_when_idle();

    // Nothing signals the purge, so watch the resident size, with a deadline well past the
    // allocator's delay and the purge thread's period.
    let deadline = Instant::now() + fleet::memory::PURGE_EVERY * 10;
    let mut now = rss();
    while now > start + allocated / 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = rss();
    }
    stop_tx.send(()).unwrap();
    worker.join().unwrap();
    assert!(
        now <= start + allocated / 5,
        "{} MB of the {} MB freed stayed resident ({start} B at start, {held} B held, {now} B now)",
        (now.saturating_sub(start)) / 1_000_000,
        allocated / 1_000_000,
    );
}
