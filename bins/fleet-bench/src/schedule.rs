//! When each task is meant to start, and which of them count.
//!
//! Open loop: task `i` is due at `start + i / rate`, whatever happened to the tasks before it. A
//! task's latency is measured from that intended time, not from when the load tool managed to
//! send it, so a server that stalls is charged for the whole stall (no coordinated omission).
//!
//! Closed loop: a fixed number of tasks are in flight; a task starts when another completes, and
//! its latency runs from that moment.
//!
//! Tasks intended during the warm-up are run but not recorded; the measured window is
//! `[start + warmup, start + warmup + duration)`.

use std::time::{Duration, Instant};

/// How tasks are started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// A fixed rate, tasks per second.
    Open { rate: f64 },
    /// A fixed number of tasks in flight.
    Closed { concurrency: usize },
}

impl Load {
    /// `--rate` wins when given (and > 0); otherwise closed loop at `concurrency`.
    pub fn from_args(rate: Option<f64>, concurrency: usize) -> Self {
        match rate {
            Some(r) if r > 0.0 => Self::Open { rate: r },
            _ => Self::Closed {
                concurrency: concurrency.max(1),
            },
        }
    }

    /// A name for labels: `max` or `<rate>/s`.
    pub fn describe(&self) -> String {
        match self {
            Self::Open { rate } => format!("{rate}/s"),
            Self::Closed { concurrency } => format!("max (closed loop, {concurrency} in flight)"),
        }
    }
}

/// The open-loop timetable.
#[derive(Clone, Copy, Debug)]
pub struct OpenSchedule {
    pub start: Instant,
    pub period: Duration,
}

impl OpenSchedule {
    pub fn new(start: Instant, rate: f64) -> Self {
        Self {
            start,
            period: Duration::from_secs_f64(1.0 / rate),
        }
    }

    /// When task `i` is due.
    pub fn intended(&self, i: u64) -> Instant {
        self.start + self.period.mul_f64(i as f64)
    }

    /// How many tasks are due by `now` (tasks `0..n` have intended times `<= now`).
    pub fn due_by(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start);
        let mut n = (elapsed.as_secs_f64() / self.period.as_secs_f64()).floor() as u64 + 1;
        // Agree exactly with `intended` despite float rounding: task n-1 is due, task n is not.
        while self.intended(n) <= now {
            n += 1;
        }
        while n > 1 && self.intended(n - 1) > now {
            n -= 1;
        }
        n
    }
}

/// The measured window of a run.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    pub fn after_warmup(run_start: Instant, warmup: Duration, duration: Duration) -> Self {
        let start = run_start + warmup;
        Self {
            start,
            end: start + duration,
        }
    }

    pub fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }

    pub fn secs(&self) -> f64 {
        (self.end - self.start).as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_times_do_not_depend_on_progress() {
        let t0 = Instant::now();
        let s = OpenSchedule::new(t0, 1000.0);
        assert_eq!(s.intended(0), t0);
        assert_eq!(s.intended(1000) - t0, Duration::from_secs(1));
        assert_eq!(s.intended(2500) - t0, Duration::from_millis(2500));
        // Task 0 is due at once; by 1 s, tasks 0..=1000 are due.
        assert_eq!(s.due_by(t0), 1);
        assert_eq!(s.due_by(t0 + Duration::from_micros(999)), 1);
        assert_eq!(s.due_by(t0 + Duration::from_secs(1)), 1001);
        // A late tool catches up: everything due is due, nothing is skipped.
        assert_eq!(s.due_by(t0 + Duration::from_millis(5250)), 5251);
    }

    #[test]
    fn due_counts_agree_with_intended_times() {
        let t0 = Instant::now();
        for rate in [3.0, 7.0, 100.0, 1000.0, 5000.0, 12345.0] {
            let s = OpenSchedule::new(t0, rate);
            for i in 0..2000 {
                let t = s.intended(i);
                // At its own intended time a task is due, and the next one is not yet.
                assert_eq!(s.due_by(t), i + 1, "rate {rate}, task {i}");
            }
        }
    }

    #[test]
    fn fractional_rates_keep_their_period() {
        let t0 = Instant::now();
        let s = OpenSchedule::new(t0, 3.0);
        assert_eq!(s.due_by(t0 + Duration::from_millis(1000)), 4);
        let i3 = s.intended(3) - t0;
        assert!(i3 >= Duration::from_millis(999) && i3 <= Duration::from_millis(1001));
    }

    #[test]
    fn the_window_excludes_warmup_and_the_tail() {
        let t0 = Instant::now();
        let w = Window::after_warmup(t0, Duration::from_secs(2), Duration::from_secs(10));
        assert!(!w.contains(t0 + Duration::from_millis(1999)));
        assert!(w.contains(t0 + Duration::from_secs(2)));
        assert!(w.contains(t0 + Duration::from_millis(11_999)));
        assert!(!w.contains(t0 + Duration::from_secs(12)));
        assert_eq!(w.secs(), 10.0);
    }

    #[test]
    fn a_rate_selects_open_loop() {
        assert_eq!(
            Load::from_args(Some(1000.0), 64),
            Load::Open { rate: 1000.0 }
        );
        assert_eq!(Load::from_args(None, 64), Load::Closed { concurrency: 64 });
        assert_eq!(
            Load::from_args(Some(0.0), 0),
            Load::Closed { concurrency: 1 }
        );
    }
}
