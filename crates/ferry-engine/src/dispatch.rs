//! Running a round's node jobs in parallel while consuming their results in a fixed order.
//!
//! Floating-point sums depend on order, so the aggregator must see updates in node order for a
//! run to be bit-identical on any number of threads. Results that finish early wait in a small
//! reorder buffer; workers do not start a job more than `2 * workers` ahead of the next one to
//! consume, which bounds that buffer (and the server's memory) by the worker count, not the
//! number of nodes.

use std::{
    collections::BTreeMap,
    sync::{
        Condvar, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
};

/// Runs `work(i)` for `i in 0..jobs` on `workers` threads; calls `arrived(i)` as each job
/// finishes and `consume(i, result)` in increasing `i`, both on the calling thread.
pub fn run_ordered<T, W, A, C>(jobs: usize, workers: usize, work: W, mut arrived: A, mut consume: C)
where
    T: Send,
    W: Fn(usize) -> T + Sync,
    A: FnMut(usize),
    C: FnMut(usize, T),
{
    let workers = workers.clamp(1, jobs.max(1));
    let window = 2 * workers;
    let next_job = AtomicUsize::new(0);
    let consumed = (Mutex::new(0usize), Condvar::new());
    let (tx, rx) = mpsc::channel::<(usize, T)>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let tx = tx.clone();
            let (work, next_job, consumed) = (&work, &next_job, &consumed);
            scope.spawn(move || {
                loop {
                    let i = next_job.fetch_add(1, Ordering::SeqCst);
                    if i >= jobs {
                        break;
                    }
                    let (lock, ready) = consumed;
                    let mut done = lock.lock().unwrap_or_else(|p| p.into_inner());
                    while i >= *done + window {
                        done = ready.wait(done).unwrap_or_else(|p| p.into_inner());
                    }
                    drop(done);
                    if tx.send((i, work(i))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending = BTreeMap::new();
        let mut next = 0;
        for (i, result) in rx {
            arrived(i);
            pending.insert(i, result);
            while let Some(result) = pending.remove(&next) {
                consume(next, result);
                next += 1;
                let (lock, ready) = &consumed;
                *lock.lock().unwrap_or_else(|p| p.into_inner()) = next;
                ready.notify_all();
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn consumes_in_order_whatever_finishes_first() {
        for workers in [1, 2, 4, 16] {
            let mut order = Vec::new();
            let mut arrivals = 0;
            run_ordered(
                20,
                workers,
                |i| {
                    // Early jobs are slowest, so later ones finish first.
                    std::thread::sleep(Duration::from_millis(((20 - i) % 5) as u64));
                    i * 10
                },
                |_| arrivals += 1,
                |i, v| order.push((i, v)),
            );
            assert_eq!(arrivals, 20);
            assert_eq!(order, (0..20).map(|i| (i, i * 10)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn never_runs_far_ahead_of_the_consumer() {
        let running_ahead = AtomicUsize::new(0);
        let consumed = AtomicUsize::new(0);
        run_ordered(
            50,
            3,
            |i| {
                let lead = i.saturating_sub(consumed.load(Ordering::SeqCst));
                running_ahead.fetch_max(lead, Ordering::SeqCst);
                if i == 0 {
                    std::thread::sleep(Duration::from_millis(30));
                }
            },
            |_| {},
            |i, ()| consumed.store(i + 1, Ordering::SeqCst),
        );
        assert!(
            running_ahead.load(Ordering::SeqCst) < 6,
            "window is 2 * workers"
        );
    }

    #[test]
    fn zero_jobs_is_fine() {
        let (mut arrived, mut consumed) = (false, false);
        run_ordered(0, 4, |_| (), |_| arrived = true, |_, ()| consumed = true);
        assert!(!arrived && !consumed);
    }
}
