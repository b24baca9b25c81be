//! The core's parallelism: rayon thread pools, one per requested thread count, built on first use and
//! kept, so a call costs a wake-up of parked workers rather than spawning threads.
//!
//! Convention of every `threads` argument: 0 = one worker per core (or `RAYON_NUM_THREADS`, as rayon
//! reads it), 1 = the calling thread alone (no pool is touched), n = a pool of n workers; never more
//! than `MAX_THREADS` (1024), whatever is asked. Callers keep tiny work on the calling thread before
//! they ask for a pool at all.

use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// Pools kept at once; a call asking for yet another count gets a pool built for that call alone.
const MAX_KEPT_POOLS: usize = 8;

/// The most workers one call may ask for (the bindings refuse more; `Workers::new` clamps to it,
/// so no count, however absurd, makes the OS spawn threads until it gives up).
pub const MAX_THREADS: usize = 1024;

/// Workers for one call: a kept pool, or none (the calling thread).
pub struct Workers {
    pool: Option<Arc<ThreadPool>>,
}

/// `(requested count, pool)`, the default (0) among them once asked for.
type Kept = Mutex<Vec<(usize, Arc<ThreadPool>)>>;

fn kept() -> &'static Kept {
    static POOLS: OnceLock<Kept> = OnceLock::new();
    POOLS.get_or_init(|| Mutex::new(Vec::new()))
}

/// What `threads = 0` means: `RAYON_NUM_THREADS` if it is set to a count, else one worker per
/// core; at most `MAX_THREADS` either way (an absurd variable must not spawn a million threads).
fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .min(MAX_THREADS)
}

fn build(threads: usize) -> Option<Arc<ThreadPool>> {
    let threads = if threads == 0 {
        default_threads()
    } else {
        threads
    };
    ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("dsa-hybrid-{i}"))
        .build()
        .ok()
        .map(Arc::new)
}

/// `threads` capped at `MAX_THREADS`.
fn clamp(threads: usize) -> usize {
    threads.min(MAX_THREADS)
}

impl Workers {
    /// The workers for `threads` (0: one per core; at most `MAX_THREADS`, larger counts are clamped).
    /// If a pool cannot be built (the OS refuses threads), the work runs on the calling thread:
    /// slower, never an error.
    pub fn new(threads: usize) -> Workers {
        let threads = clamp(threads);
        if threads == 1 {
            return Workers { pool: None };
        }
        let mut pools = kept().lock().unwrap_or_else(|p| p.into_inner());
        // A count equal to the default pool's is served by that pool.
        let same = |(n, p): &&(usize, Arc<ThreadPool>)| {
            *n == threads || (*n == 0 && p.current_num_threads() == threads)
        };
        if let Some((_, p)) = pools.iter().find(same) {
            return Workers {
                pool: Some(Arc::clone(p)),
            };
        }
        let pool = build(threads);
        if let Some(p) = &pool {
            if pools.len() < MAX_KEPT_POOLS {
                pools.push((threads, Arc::clone(p)));
            }
        }
        Workers { pool }
    }

    /// The calling thread alone.
    pub fn current() -> Workers {
        Workers { pool: None }
    }

    /// How many threads `run` spreads work over.
    pub fn count(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.current_num_threads())
    }

    /// Run `f` with its parallel iterators on these workers (the calling thread waits for it).
    /// With no pool, `f` runs on the calling thread; it must then not use parallel iterators.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

/// Run `f(first_row, rows, state)` over `out` cut into chunks of whole rows of `row_len`, spread
/// over `threads` workers of the pool the caller runs in (`Workers::run`); with `threads == 1`, in
/// order on the calling thread. Each worker builds its own `state` with `init` (maybe several times).
/// Returns the error of the lowest failing chunk, if any (every chunk still runs).
pub fn for_each_row_chunk<T, S, E, I, F>(
    out: &mut [T],
    row_len: usize,
    threads: usize,
    init: I,
    f: F,
) -> Result<(), E>
where
    T: Send,
    E: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(usize, &mut [T], &mut S) -> Result<(), E> + Sync + Send,
{
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let threads = threads.clamp(1, rows.max(1));
    if threads == 1 {
        return if out.is_empty() {
            Ok(())
        } else {
            f(0, out, &mut init())
        };
    }
    // A few chunks per worker, so ragged rows still balance.
    let chunk_rows = rows.div_ceil(threads * 4).max(1);
    out.par_chunks_mut(chunk_rows * row_len)
        .enumerate()
        .map_init(&init, |state, (i, c)| {
            f(i * chunk_rows, c, state).err().map(|e| (i, e))
        })
        .flatten()
        .min_by_key(|(i, _)| *i)
        .map_or(Ok(()), |(_, e)| Err(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_once_and_the_first_error_wins() {
        for threads in [1, 2, 5] {
            let w = Workers::new(threads);
            let n = w.count();
            assert_eq!(n, threads);
            let mut out = vec![0usize; 37 * 3];
            w.run(|| {
                for_each_row_chunk(
                    &mut out,
                    3,
                    n,
                    || (),
                    |row, c: &mut [usize], _| {
                        for (i, r) in c.chunks_mut(3).enumerate() {
                            r.fill(row + i + 1);
                        }
                        Ok::<(), ()>(())
                    },
                )
            })
            .unwrap();
            let want: Vec<usize> = (1..=37).flat_map(|r| [r; 3]).collect();
            assert_eq!(out, want);
            let err = w.run(|| {
                for_each_row_chunk(
                    &mut out,
                    3,
                    n,
                    || (),
                    |row, c: &mut [usize], _| match (row..row + c.len() / 3).find(|r| r % 10 == 9) {
                        Some(r) => Err(r),
                        None => Ok(()),
                    },
                )
            });
            assert_eq!(err, Err(9));
        }
    }

    #[test]
    fn pools_are_kept_and_the_default_has_one_worker_per_core() {
        let a = Workers::new(3);
        let b = Workers::new(3);
        assert!(Arc::ptr_eq(
            a.pool.as_ref().unwrap(),
            b.pool.as_ref().unwrap()
        ));
        assert_eq!(Workers::new(1).count(), 1);
        assert_eq!(Workers::current().count(), 1);
        assert!(Workers::new(0).count() >= 1);
        // An absurd count is clamped, not spawned (not built here: 1024 threads is a lot for CI).
        assert_eq!(clamp(usize::MAX), MAX_THREADS);
        assert_eq!(clamp(3), 3);
        assert!((1..=MAX_THREADS).contains(&default_threads()));
        // Work runs on the pool's threads.
        let name = a.run(|| std::thread::current().name().map(str::to_owned));
        assert!(name.unwrap().starts_with("dsa-hybrid-"));
    }

    #[test]
    fn empty_and_zero_width_outputs() {
        let w = Workers::new(2);
        let mut out: Vec<u8> = Vec::new();
        assert_eq!(
            w.run(|| for_each_row_chunk(&mut out, 4, 2, || (), |_, _, _| Err::<(), ()>(()))),
            Ok(())
        );
        assert_eq!(
            for_each_row_chunk(&mut out, 0, 1, || (), |_, _, _| Ok::<(), ()>(())),
            Ok(())
        );
    }
}
