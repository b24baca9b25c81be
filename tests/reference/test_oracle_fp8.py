"""dsa.md §4: FP8 e4m3fn encoding, power-of-two scales, and the Rust core's bit-identity with them."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsa_hybrid import _core, reference, testing

ALL_CODES = np.arange(256, dtype=np.uint8)


def test_every_code_decodes_like_ml_dtypes():
    ours = reference.fp8_decode(ALL_CODES)
    theirs = ALL_CODES.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = ~np.isnan(theirs)
    np.testing.assert_array_equal(ours[finite], theirs[finite])
    np.testing.assert_array_equal(np.signbit(ours[finite]), np.signbit(theirs[finite]))
    assert np.isnan(ours).sum() == 2  # 0x7F and 0xFF only: e4m3fn has no infinities


def test_rust_decode_table_matches_reference():
    rust = _core.fp8_decode_table().astype(np.float64)
    ref = reference.fp8_decode(ALL_CODES)
    np.testing.assert_array_equal(np.isnan(rust), np.isnan(ref))
    np.testing.assert_array_equal(rust[~np.isnan(ref)], ref[~np.isnan(ref)])


def test_encode_inverts_decode_on_every_finite_code():
    finite = ALL_CODES[(ALL_CODES & 0x7F) != 0x7F]
    np.testing.assert_array_equal(reference.fp8_encode(reference.fp8_decode(finite)), finite)


@given(testing.float_arrays((4096,), np.float32, scale=100.0))
def test_encode_rounds_like_ml_dtypes_in_range(x):
    # float32 inputs: ml_dtypes converts float64 through float32 (double rounding: 68.000001 → 64),
    # while the oracle rounds float64 directly (→ 72), so the two agree only on float32 values.
    x = np.clip(x, -448.0, 448.0)
    theirs = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(reference.fp8_encode(x), theirs)


def test_encode_rounds_float64_directly():
    # Just above the midpoint of 64 and 72: nearest is 72 (0x69), even if float32 would round to 68.
    assert reference.fp8_encode(np.array([68.000001])).tolist() == [0x69]
    assert reference.fp8_encode(np.array([68.0])).tolist() == [0x68]


def test_encode_ties_go_to_even_and_large_values_saturate():
    grid = reference.fp8_decode(np.arange(0, 0x7F, dtype=np.uint8))  # all non-negative finite values
    mid = (grid[:-1] + grid[1:]) / 2  # exact midpoints (representable in float64)
    codes = reference.fp8_encode(mid)
    lower = np.arange(0, 0x7E)
    expect = np.where(lower % 2 == 0, lower, lower + 1)  # even mantissa wins
    np.testing.assert_array_equal(codes, expect.astype(np.uint8))
    assert reference.fp8_encode(np.array([1e9, -1e9, 449.0, 470.0])).tolist() == [0x7E, 0xFE, 0x7E, 0x7E]
    with pytest.raises(ValueError, match="NaN"):
        reference.fp8_encode(np.array([np.nan]))


@given(st.floats(min_value=0.0, max_value=1e30, allow_nan=False))
def test_scales_are_powers_of_two_and_fit_448(amax):
    s = float(reference.pow2_scale(np.array(amax)))
    assert np.log2(s) == np.round(np.log2(s))
    a = max(amax, 1e-4)
    assert a / s <= 448.0
    assert a / (s / 2) > 448.0  # the smallest such power of two


@given(testing.float_arrays((7, 128), np.float32, scale=50.0))
def test_quantize_bounds_and_error(x):
    codes, scales = reference.quantize_fp8(x)
    assert codes.dtype == np.uint8 and scales.dtype == np.float32 and scales.shape == (7,)
    v = reference.fp8_decode(codes)
    assert np.abs(v).max() <= 448.0
    back = reference.dequantize_fp8(codes, scales)
    # 3 mantissa bits: relative error ≤ 2^-4 on normals, plus half a subnormal step.
    err = np.abs(back - x)
    assert np.all(err <= np.abs(x) / 16 + scales[:, None].astype(np.float64) * 2.0**-10)


@given(testing.float_arrays((5, 512), np.float32, scale=3.0))
def test_tiled_quantize_has_one_scale_per_tile(x):
    codes, scales = reference.quantize_fp8(x, tile=128)
    assert scales.shape == (5, 4)
    for t in range(4):
        c, s = reference.quantize_fp8(x[:, 128 * t : 128 * (t + 1)])
        np.testing.assert_array_equal(codes[:, 128 * t : 128 * (t + 1)], c)
        np.testing.assert_array_equal(scales[:, t], s)


def test_quantize_rejects_non_finite():
    with pytest.raises(ValueError, match="NaN or inf"):
        reference.quantize_fp8(np.array([1.0, np.inf]))


@given(
    x=testing.float_arrays((9, 128), np.float32, scale=20.0),
    hadamard=st.booleans(),
    zero_row=st.booleans(),
)
def test_rust_quantize_is_bit_identical_to_reference(x, hadamard, zero_row):
    if zero_row:
        x[3] = 0.0  # amax below the 1e-4 floor
    codes, scales = _core.fp8_quantize_rows(x, hadamard=hadamard)
    ref_codes, ref_scales = reference.quantize_fp8(reference.hadamard(x) if hadamard else x)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(scales, ref_scales)


def test_rust_quantize_rejects_bad_input():
    x = np.ones((2, 128), dtype=np.float32)
    x[1, 5] = np.nan
    with pytest.raises(ValueError, match=r"x: non-finite value .* row 1, column 5"):
        _core.fp8_quantize_rows(x)
    with pytest.raises(ValueError, match="power-of-two"):
        _core.fp8_quantize_rows(np.ones((2, 96), dtype=np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        _core.fp8_quantize_rows(np.ones((4, 256), dtype=np.float32)[:, ::2])
    with pytest.raises(ValueError, match="at least one column"):
        _core.fp8_quantize_rows(np.ones((2, 0), dtype=np.float32), hadamard=False)
    with pytest.raises(TypeError):
        _core.fp8_quantize_rows(np.ones((2, 128), dtype=np.float64))
    codes, scales = _core.fp8_quantize_rows(np.ones((0, 128), dtype=np.float32))
    assert codes.shape == (0, 128) and scales.shape == (0,)
