//! Starts tasks on schedule (open loop) or as others complete (closed loop), and counts what
//! falls in the measured window. The modes supply what "start a task" means.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::schedule::{Load, OpenSchedule, Window};

/// Counters shared by the scheduler and whatever sees tasks complete.
pub struct Meter {
    pub window: Window,
    /// Tasks intended inside the window.
    pub offered: AtomicU64,
    /// Final events received inside the window.
    pub completed: AtomicU64,
    /// Refused or failed tasks (any time).
    pub errors: AtomicU64,
    /// Closed loop: one permit per task that may start.
    pub permits: Arc<Semaphore>,
    closed: bool,
}

impl Meter {
    pub fn new(window: Window, load: Load) -> Arc<Self> {
        let (permits, closed) = match load {
            Load::Closed { concurrency } => (concurrency, true),
            Load::Open { .. } => (0, false),
        };
        Arc::new(Self {
            window,
            offered: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            permits: Arc::new(Semaphore::new(permits)),
            closed,
        })
    }

    /// A task ended (completed or failed) at `at`: counts it and, in closed loop, lets the next
    /// one start.
    pub fn finished(&self, at: Instant, ok: bool) {
        if ok {
            if self.window.contains(at) {
                self.completed.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.closed {
            self.permits.add_permits(1);
        }
    }

    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }
    pub fn offered(&self) -> u64 {
        self.offered.load(Ordering::Relaxed)
    }
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// The current time on tokio's clock (the same as `Instant::now()` unless a test paused time).
pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Runs the schedule from `start` until the window ends, calling `start_task(i, intended)` for
/// each task. Returns how many tasks were started.
pub async fn drive<F>(load: Load, start: Instant, meter: &Meter, mut start_task: F) -> u64
where
    F: FnMut(u64, Instant),
{
    let end = meter.window.end;
    let mut i: u64 = 0;
    match load {
        Load::Open { rate } => {
            let schedule = OpenSchedule::new(start, rate);
            loop {
                let due = schedule.due_by(now());
                while i < due {
                    let intended = schedule.intended(i);
                    if intended >= end {
                        return i;
                    }
                    if meter.window.contains(intended) {
                        meter.offered.fetch_add(1, Ordering::Relaxed);
                    }
                    start_task(i, intended);
                    i += 1;
                }
                let next = schedule.intended(i);
                if next >= end {
                    return i;
                }
                tokio::time::sleep_until(next.into()).await;
            }
        }
        Load::Closed { .. } => loop {
            let permit = tokio::select! {
                p = meter.permits.acquire() => p,
                _ = tokio::time::sleep_until(end.into()) => return i,
            };
            let Ok(permit) = permit else { return i };
            permit.forget();
            let t = now();
            if t >= end {
                return i;
            }
            if meter.window.contains(t) {
                meter.offered.fetch_add(1, Ordering::Relaxed);
            }
            start_task(i, t);
            i += 1;
        },
    }
}

/// Waits until `done()` or `timeout`, polling every 20 ms.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let give_up = now() + timeout;
    loop {
        if done() {
            return true;
        }
        if now() >= give_up {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn open_loop_starts_every_task_of_the_schedule_in_order() {
        let start = now();
        let window = Window::after_warmup(start, Duration::from_secs(1), Duration::from_secs(2));
        let load = Load::Open { rate: 100.0 };
        let meter = Meter::new(window, load);
        let mut seen = Vec::new();
        let n = drive(load, start, &meter, |i, t| seen.push((i, t))).await;
        assert_eq!(n, 300);
        assert_eq!(seen.len(), 300);
        assert!(
            seen.windows(2)
                .all(|w| w[0].0 + 1 == w[1].0 && w[0].1 < w[1].1)
        );
        assert_eq!(meter.offered(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn closed_loop_starts_a_task_only_when_one_finished() {
        let start = now();
        let window = Window::after_warmup(start, Duration::ZERO, Duration::from_secs(1));
        let load = Load::Closed { concurrency: 4 };
        let meter = Meter::new(window, load);
        let mut started = 0;
        // Nothing ever finishes: exactly `concurrency` tasks start.
        let n = drive(load, start, &meter, |_, _| started += 1).await;
        assert_eq!((n, started), (4, 4));
        meter.finished(start, true);
        assert_eq!(meter.permits.available_permits(), 1);
        assert_eq!(meter.completed(), 1);
        meter.finished(start, false);
        assert_eq!(meter.errors(), 1);
    }
}
