//! Rows of an output buffer handed out to scoped threads in chunks.

use std::sync::Mutex;

/// The number of threads to use for `threads` (0: all the cores).
pub fn resolve_threads(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Run `f(first_row, rows, state)` over `out` cut into chunks of whole rows of
/// `row_len`, on up to `threads` threads pulling chunks from a shared queue.
/// Each thread builds its own `state` with `init`. Returns the error of the
/// lowest failing chunk, if any (every chunk still runs).
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
    I: Fn() -> S + Sync,
    F: Fn(usize, &mut [T], &mut S) -> Result<(), E> + Sync,
{
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let threads = threads.clamp(1, rows.max(1));
    // A few chunks per thread, so ragged rows still balance.
    let chunk_rows = rows.div_ceil(threads * 4).max(1);
    let chunks = out
        .chunks_mut(chunk_rows * row_len.max(1))
        .enumerate()
        .map(|(i, c)| (i * chunk_rows, c));
    if threads == 1 {
        let mut state = init();
        let mut first_err = None;
        for (row, c) in chunks {
            if let Err(e) = f(row, c, &mut state) {
                first_err.get_or_insert(e);
            }
        }
        return first_err.map_or(Ok(()), Err);
    }
    let queue = Mutex::new(chunks);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut state = init();
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((row, c)) = next else { break };
                    if let Err(e) = f(row, c, &mut state) {
                        errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((row, e));
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    errors
        .into_iter()
        .min_by_key(|(row, _)| *row)
        .map_or(Ok(()), |(_, e)| Err(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_once_and_the_first_error_wins() {
        for threads in [1, 2, 5] {
            let mut out = vec![0usize; 37 * 3];
            for_each_row_chunk(
                &mut out,
                3,
                threads,
                || (),
                |row, c: &mut [usize], _| {
                    for (i, r) in c.chunks_mut(3).enumerate() {
                        r.fill(row + i + 1);
                    }
                    Ok::<(), ()>(())
                },
            )
            .unwrap();
            let want: Vec<usize> = (1..=37).flat_map(|r| [r; 3]).collect();
            assert_eq!(out, want);
            let err = for_each_row_chunk(
                &mut out,
                3,
                threads,
                || (),
                |row, c: &mut [usize], _| match (row..row + c.len() / 3).find(|r| r % 10 == 9) {
                    Some(r) => Err(r),
                    None => Ok(()),
                },
            );
            assert_eq!(err, Err(9));
        }
    }
}
