"""dsa.md §6 byte layouts: 132-byte indexer-key pages and 656/1152-byte MLA latent rows."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsa_hybrid import reference, testing


@given(n=st.integers(1, 200), block=st.sampled_from([16, 64, 128]), seed=st.integers(0, 2**32 - 1))
def test_indexer_pages_layout_and_round_trip(n, block, seed):
    keys = np.random.default_rng(seed).standard_normal((n, 128)).astype(np.float32)
    codes, scales = reference.quantize_indexer_keys(keys)
    pages = reference.pack_indexer_pages(codes, scales, block_size=block)
    assert pages.dtype == np.uint8 and pages.shape == (-(-n // block), block * 132)
    # Token i of page p: 128 code bytes at 128·i, its f32 scale at 128·block + 4·i (little endian).
    for i in {0, n - 1, n // 2}:
        p, o = divmod(i, block)
        np.testing.assert_array_equal(pages[p, 128 * o : 128 * (o + 1)], codes[i])
        assert (
            pages[p, 128 * block + 4 * o : 128 * block + 4 * o + 4].tobytes()
            == np.float32(scales[i]).astype("<f4").tobytes()
        )
    back_codes, back_scales = reference.unpack_indexer_pages(pages, n, block_size=block)
    np.testing.assert_array_equal(back_codes, codes)
    np.testing.assert_array_equal(back_scales, scales)


def test_default_page_is_8448_bytes():
    codes, scales = reference.quantize_indexer_keys(np.ones((64, 128)))
    assert reference.pack_indexer_pages(codes, scales).shape == (1, 8448)


@given(testing.float_arrays((6, 576), np.float32, scale=4.0))
def test_mla_fp8_rows_round_trip(x):
    c_kv, k_pe = x[:, :512], x[:, 512:]
    rows = reference.pack_mla_fp8(c_kv, k_pe)
    assert rows.shape == (6, 656) and rows.dtype == np.uint8
    codes, scales = reference.quantize_fp8(c_kv, tile=128)
    np.testing.assert_array_equal(rows[:, :512], codes)
    np.testing.assert_array_equal(rows[:, 512:528].copy().view("<f4"), scales)
    back_c, back_pe = reference.unpack_mla_fp8(rows)
    np.testing.assert_array_equal(back_c, reference.dequantize_fp8(codes, scales, tile=128))
    np.testing.assert_array_equal(back_pe, k_pe.astype(ml_dtypes.bfloat16).astype(np.float64))
    # Unpacked values are a fixed point (a tile's scale may halve when its amax rounds down, but every
    # value stays representable).
    again_c, again_pe = reference.unpack_mla_fp8(reference.pack_mla_fp8(back_c, back_pe))
    np.testing.assert_array_equal(again_c, back_c)
    np.testing.assert_array_equal(again_pe, back_pe)


@given(testing.float_arrays((5, 576), np.float32))
def test_mla_bf16_rows_round_trip(x):
    rows = reference.pack_mla_bf16(x[:, :512], x[:, 512:])
    assert rows.shape == (5, 1152)
    c, pe = reference.unpack_mla_bf16(rows)
    bf = x.astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(c, bf[:, :512])
    np.testing.assert_array_equal(pe, bf[:, 512:])


def test_mla_fp8_rejects_wrong_widths():
    with pytest.raises(ValueError, match=r"c_kv \[n, 512\]"):
        reference.pack_mla_fp8(np.zeros((2, 500)), np.zeros((2, 64)))
