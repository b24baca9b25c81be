//! Orthonormal Walsh–Hadamard transform in Sylvester order (dsa.md §4).

/// `fwht` was given a length that is not a power of two (nothing was changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotPowerOfTwo(pub usize);

impl std::fmt::Display for NotPowerOfTwo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hadamard: length {} is not a power of two", self.0)
    }
}

impl std::error::Error for NotPowerOfTwo {}

/// In place: butterflies `(a, b) -> (a + b, a - b)` at strides 1, 2, …, n/2,
/// then division by `sqrt(n)`. `v.len()` must be a power of two (an error otherwise,
/// `v` untouched). The order of operations matches `dsa_hybrid.reference.hadamard`,
/// so results are identical.
pub fn fwht(v: &mut [f64]) -> Result<(), NotPowerOfTwo> {
    let n = v.len();
    if !n.is_power_of_two() {
        return Err(NotPowerOfTwo(n));
    }
    let mut h = 1;
    while h < n {
        // The same butterflies as index loops would do, written so the compiler vectorizes them.
        for block in v.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                let (a, b) = (*x, *y);
                *x = a + b;
                *y = a - b;
            }
        }
        h *= 2;
    }
    let norm = (n as f64).sqrt();
    for x in v.iter_mut() {
        *x /= norm;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_sylvester_matrix() {
        let n = 16;
        for j in 0..n {
            let mut e = vec![0.0; n];
            e[j] = 1.0;
            fwht(&mut e).unwrap();
            for (i, x) in e.iter().enumerate() {
                let sign = if (i & j).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                };
                assert!((x - sign / (n as f64).sqrt()).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn other_lengths_are_an_error_and_change_nothing() {
        for n in [0usize, 3, 6, 12] {
            let mut v = vec![1.0; n];
            assert_eq!(fwht(&mut v), Err(NotPowerOfTwo(n)));
            assert!(v.iter().all(|x| *x == 1.0));
        }
    }

    #[test]
    fn is_an_involution() {
        let v0: Vec<f64> = (0..128).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut v = v0.clone();
        fwht(&mut v).unwrap();
        fwht(&mut v).unwrap();
        for (a, b) in v.iter().zip(&v0) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
