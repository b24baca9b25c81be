//! Row-wise FP8 quantization of indexer keys and queries (dsa.md §4): optional
//! Hadamard rotation, then one power-of-two scale per row.

use crate::{fp8, hadamard};

/// Why a batch of rows could not be quantized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuantError {
    /// A NaN or infinity at `(row, col)`.
    NonFinite { row: usize, col: usize },
    /// The Hadamard rotation needs a power-of-two width.
    WidthNotPowerOfTwo(usize),
    /// Rows must have at least one element.
    ZeroWidth,
}

impl std::fmt::Display for QuantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantError::NonFinite { row, col } => {
                write!(
                    f,
                    "non-finite value (NaN or inf) at row {row}, column {col}"
                )
            }
            QuantError::ZeroWidth => write!(f, "rows must have at least one column"),
            QuantError::WidthNotPowerOfTwo(d) => {
                write!(
                    f,
                    "the Hadamard rotation needs a power-of-two width, got {d}"
                )
            }
        }
    }
}

impl std::error::Error for QuantError {}

/// Quantize `rows` (`n × width`, row-major) into `codes` (same size) and
/// `scales` (`n`). With `rotate`, each row is first multiplied by the
/// orthonormal Hadamard matrix. Checks everything before writing anything.
pub fn quantize_rows(
    rows: &[f32],
    width: usize,
    rotate: bool,
    codes: &mut [u8],
    scales: &mut [f32],
) -> Result<(), QuantError> {
    if width == 0 {
        return Err(QuantError::ZeroWidth);
    }
    if rotate && !width.is_power_of_two() {
        return Err(QuantError::WidthNotPowerOfTwo(width));
    }
    if let Some(i) = rows.iter().position(|x| !x.is_finite()) {
        return Err(QuantError::NonFinite {
            row: i / width,
            col: i % width,
        });
    }
    let mut buf = vec![0.0f64; width];
    for ((row, out), scale) in rows
        .chunks_exact(width)
        .zip(codes.chunks_exact_mut(width))
        .zip(scales.iter_mut())
    {
        for (b, x) in buf.iter_mut().zip(row) {
            *b = f64::from(*x);
        }
        if rotate {
            hadamard::fwht(&mut buf);
        }
        *scale = fp8::quantize(&buf, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_finite_without_writing() {
        let mut rows = vec![1.0f32; 256];
        rows[130] = f32::NAN;
        let mut codes = vec![7u8; 256];
        let mut scales = vec![3.0f32; 2];
        let err = quantize_rows(&rows, 128, true, &mut codes, &mut scales).unwrap_err();
        assert_eq!(err, QuantError::NonFinite { row: 1, col: 2 });
        assert!(codes.iter().all(|c| *c == 7) && scales.iter().all(|s| *s == 3.0));
    }

    #[test]
    fn constant_row_rotates_to_one_spike() {
        // H * (1, …, 1) = (sqrt(n), 0, …, 0): one code at 448 / 2 after scaling.
        let rows = vec![1.0f32; 128];
        let mut codes = vec![0u8; 128];
        let mut scales = vec![0.0f32; 1];
        quantize_rows(&rows, 128, true, &mut codes, &mut scales).unwrap();
        let first = f64::from(fp8::DECODE_TABLE[codes[0] as usize]) * f64::from(scales[0]);
        assert!((first - 128f64.sqrt()).abs() < 128f64.sqrt() / 16.0);
        assert!(codes[1..].iter().all(|c| *c == 0));
    }
}
