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
    /// The buffers do not hold whole rows of one size (a caller bug).
    Shape(String),
    /// Row `row` is so large that its FP8 values times its scale would not fit in a float32
    /// (its scale would pass 2^119: 448 · 2^120 is past `f32::MAX`).
    ScaleOverflow { row: usize },
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
            QuantError::Shape(m) => f.write_str(m),
            QuantError::ScaleOverflow { row } => write!(
                f,
                "row {row} is too large to quantize: its FP8 values times its scale would overflow float32"
            ),
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

/// The largest scale: 2^119, the last power of two with `448 · scale <= f32::MAX`, so every
/// decoded value (`code · scale`, `|code| <= 448`) is a finite float32.
const MAX_SCALE: f64 = (1u128 << 119) as f64;
/// The largest (rotated) magnitude a row may have: `448 · MAX_SCALE` (about 2.98e38).
const AMAX_LIMIT: f64 = fp8::E4M3_MAX * MAX_SCALE;

/// Quantize `rows` (`n × width`, row-major) into `codes` (same size) and
/// `scales` (`n`). With `rotate`, each row is first multiplied by the
/// orthonormal Hadamard matrix. Checks everything before writing anything:
/// finiteness, the sizes, and that every decoded value (`code · scale`) fits in
/// a float32 (so a cache never holds a key that decodes to infinity).
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
    if !rows.len().is_multiple_of(width)
        || codes.len() != rows.len()
        || scales.len() != rows.len() / width
    {
        return Err(QuantError::Shape(format!(
            "{} values, {} codes and {} scales are not whole rows of {width}",
            rows.len(),
            codes.len(),
            scales.len()
        )));
    }
    if let Some(i) = rows.iter().position(|x| !x.is_finite()) {
        return Err(QuantError::NonFinite {
            row: i / width,
            col: i % width,
        });
    }
    let mut buf = vec![0.0f64; width];
    // A rotated row's magnitudes are at most sqrt(width) · its largest: only rows past that bound
    // can overflow the scale, and only they are rotated twice (here, then below) to know exactly.
    let bound = if rotate { (width as f64).sqrt() } else { 1.0 };
    for (row, values) in rows.chunks_exact(width).enumerate() {
        let amax = values.iter().fold(0.0f64, |m, x| m.max(f64::from(x.abs())));
        if amax * bound > AMAX_LIMIT {
            for (b, x) in buf.iter_mut().zip(values) {
                *b = f64::from(*x);
            }
            if rotate {
                hadamard::fwht(&mut buf).map_err(|_| QuantError::WidthNotPowerOfTwo(width))?;
            }
            let amax = buf.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            if f64::from(fp8::pow2_scale(amax)) > MAX_SCALE {
                return Err(QuantError::ScaleOverflow { row });
            }
        }
    }
    for ((row, out), scale) in rows
        .chunks_exact(width)
        .zip(codes.chunks_exact_mut(width))
        .zip(scales.iter_mut())
    {
        for (b, x) in buf.iter_mut().zip(row) {
            *b = f64::from(*x);
        }
        if rotate {
            hadamard::fwht(&mut buf).map_err(|_| QuantError::WidthNotPowerOfTwo(width))?;
        }
        // Same lengths (whole rows), and the scale was checked above.
        *scale = fp8::quantize(&buf, out).map_err(|e| QuantError::Shape(e.to_string()))?;
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

    #[test]
    fn mismatched_buffers_and_overflowing_scales_are_refused_without_writing() {
        let mut codes = [7u8; 256];
        let mut scales = [3.0f32; 2];
        let rows = [1.0f32; 256];
        for (r, c, s) in [(255usize, 256usize, 2usize), (256, 255, 2), (256, 256, 1)] {
            let err = quantize_rows(&rows[..r], 128, true, &mut codes[..c], &mut scales[..s]);
            assert!(matches!(err, Err(QuantError::Shape(_))), "{err:?}");
        }
        // H · (c, …, c) = (c · 256, 0, …) at width 65536: past 448 · 2^119 for c = 3e37.
        let width = 1 << 16;
        let mut big = vec![0.5f32; 2 * width];
        big[width..].fill(3.0e37);
        let mut codes = vec![7u8; 2 * width];
        let mut scales = [3.0f32; 2];
        assert_eq!(
            quantize_rows(&big, width, true, &mut codes, &mut scales),
            Err(QuantError::ScaleOverflow { row: 1 })
        );
        assert!(codes.iter().all(|c| *c == 7) && scales == [3.0, 3.0]);
        // Unrotated, the same row fits (3e37 <= 448 · 2^119); f32::MAX itself does not.
        quantize_rows(&big, width, false, &mut codes, &mut scales).unwrap();
        assert!(scales.iter().all(|s| s.is_finite()));
        let decoded = f64::from(fp8::DECODE_TABLE[codes[width] as usize]) * f64::from(scales[1]);
        assert!(decoded <= f64::from(f32::MAX));
        let edge = [f32::MAX, 1.0];
        let (mut c2, mut s2) = ([0u8; 2], [0f32; 1]);
        assert_eq!(
            quantize_rows(&edge, 2, false, &mut c2, &mut s2),
            Err(QuantError::ScaleOverflow { row: 0 })
        );
        let ok = [2.9e38f32, 1.0];
        quantize_rows(&ok, 2, false, &mut c2, &mut s2).unwrap();
        let top = f64::from(fp8::DECODE_TABLE[c2[0] as usize]) * f64::from(s2[0]);
        assert!(top <= f64::from(f32::MAX) && top > 2.0e38, "{top}");
    }
}
