//! Orthonormal Walsh–Hadamard transform in Sylvester order (dsa.md §4).

/// In place: butterflies `(a, b) -> (a + b, a - b)` at strides 1, 2, …, n/2,
/// then division by `sqrt(n)`. `v.len()` must be a power of two. The order of
/// operations matches `dsa_hybrid.reference.hadamard`, so results are identical.
pub fn fwht(v: &mut [f64]) {
    let n = v.len();
    assert!(
        n.is_power_of_two(),
        "hadamard: length {n} is not a power of two"
    );
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
            fwht(&mut e);
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
    fn is_an_involution() {
        let v0: Vec<f64> = (0..128).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut v = v0.clone();
        fwht(&mut v);
        fwht(&mut v);
        for (a, b) in v.iter().zip(&v0) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
