//! Bounded concurrency without an async runtime: a fixed pool of scoped threads pulling item
//! indices from one atomic counter, so at most `concurrency` calls run at once and every item
//! is taken by exactly one worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs `work(index, item)` on every item with at most `concurrency` (at least 1) running at
/// once. Once `stop` is set no new item is started; the result of an item never started is
/// `None`. Results come back in item order.
pub fn run_bounded<T, R, F>(
    items: &[T],
    concurrency: usize,
    stop: &AtomicBool,
    work: F,
) -> Vec<Option<R>>
where
    T: Sync,
    R: Send,
    F: Fn(usize, &T) -> R + Sync,
{
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = concurrency.max(1).min(items.len());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let index = next.fetch_add(1, Ordering::SeqCst);
                let Some(item) = items.get(index) else { break };
                let result = work(index, item);
                *results[index].lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_item_runs_once_and_never_more_than_the_bound_at_once() {
        let items: Vec<usize> = (0..40).collect();
        let in_flight = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let results = run_bounded(&items, 3, &stop, |i, item| {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
            in_flight.fetch_sub(1, Ordering::SeqCst);
            i * 100 + item
        });
        let expected: Vec<Option<usize>> = (0..40).map(|i| Some(i * 101)).collect();
        assert_eq!(results, expected);
        assert!(peak.load(Ordering::SeqCst) <= 3);
    }

    #[test]
    fn a_stop_leaves_the_rest_unstarted() {
        let items: Vec<usize> = (0..10).collect();
        let stop = AtomicBool::new(false);
        let results = run_bounded(&items, 1, &stop, |i, _| {
            if i == 3 {
                stop.store(true, Ordering::SeqCst);
            }
            i
        });
        assert_eq!(results[..4], [Some(0), Some(1), Some(2), Some(3)]);
        assert!(results[4..].iter().all(Option::is_none));
        assert!(run_bounded(&[] as &[u8], 4, &stop, |_, _| 0).is_empty());
    }
}
