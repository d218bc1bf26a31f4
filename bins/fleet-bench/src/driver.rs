//! Starts tasks on schedule (open loop) or as others complete (closed loop), and counts what
//! falls in the measured window. The modes supply what "start a task" means.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

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
/// each task. Returns how many tasks were started. The open loop wakes on a [`Pacer`] thread.
pub async fn drive<F>(load: Load, start: Instant, meter: &Meter, start_task: F) -> u64
where
    F: FnMut(u64, Instant),
{
    drive_with(load, start, meter, Wake::Pacer, start_task).await
}

/// What the open loop waits on between tasks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Wake {
    /// A [`Pacer`] thread: to within the OS's timer precision (tens of microseconds).
    Pacer,
    /// tokio's timer (whole milliseconds); for tests that pause tokio's clock.
    #[cfg_attr(not(test), allow(dead_code))]
    Tokio,
}

async fn drive_with<F>(
    load: Load,
    start: Instant,
    meter: &Meter,
    wake: Wake,
    mut start_task: F,
) -> u64
where
    F: FnMut(u64, Instant),
{
    let end = meter.window.end;
    let mut i: u64 = 0;
    match load {
        Load::Open { rate } => {
            let schedule = OpenSchedule::new(start, rate);
            let pacer = (wake == Wake::Pacer).then(|| Pacer::start(schedule, end));
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
                match &pacer {
                    Some(p) => p.tick.notified().await,
                    None => tokio::time::sleep_until(next.into()).await,
                }
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

/// A thread that wakes the open loop at each task's intended time.
///
/// Latency is measured from the intended time, so however late the load tool starts a task is
/// part of every number it reports. tokio's timer has whole-millisecond ticks: woken by it, a
/// task due inside a tick starts up to a millisecond late, which at 1,000/s is as large as what
/// is being measured. A thread of its own sleeps to the intended time with the OS's precision
/// and wakes the loop; the tasks themselves still run on the runtime. (The BullMQ bench paces
/// its producer the same way, so both tools are charged alike.)
struct Pacer {
    tick: Arc<Notify>,
    stop: Arc<AtomicBool>,
}

impl Pacer {
    fn start(schedule: OpenSchedule, end: Instant) -> Self {
        let tick = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tick.clone(), stop.clone());
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    // The first task not yet due.
                    let next = schedule.intended(schedule.due_by(now));
                    if next >= end {
                        break;
                    }
                    std::thread::sleep(next - now);
                    // A permit is kept if the loop is not waiting yet: no wake-up is lost.
                    t.notify_one();
                }
                // A last permit: the loop never waits on a pacer that has ended.
                t.notify_one();
            })
            .expect("spawning the pacer thread");
        Self { tick, stop }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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
        let n = drive_with(load, start, &meter, Wake::Tokio, |i, t| seen.push((i, t))).await;
        assert_eq!(n, 300);
        assert_eq!(seen.len(), 300);
        assert!(
            seen.windows(2)
                .all(|w| w[0].0 + 1 == w[1].0 && w[0].1 < w[1].1)
        );
        assert_eq!(meter.offered(), 200);
    }

    #[tokio::test]
    async fn the_pacer_starts_every_task_in_order_and_none_early() {
        let start = now() + Duration::from_millis(10);
        let window = Window::after_warmup(start, Duration::ZERO, Duration::from_millis(200));
        let load = Load::Open { rate: 1000.0 };
        let meter = Meter::new(window, load);
        let mut seen = Vec::new();
        // As the modes do: the run starts at `start`.
        tokio::time::sleep_until(start.into()).await;
        let n = drive(load, start, &meter, |i, intended| {
            seen.push((i, intended, now()))
        })
        .await;
        assert_eq!(n, 200);
        assert!(seen.iter().enumerate().all(|(k, &(i, _, _))| i == k as u64));
        assert!(
            seen.iter().all(|&(_, intended, at)| at >= intended),
            "a task started before its intended time"
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
