"""Index coding: `pack` and `ans` round trips, sizes, edge cases, rate close to the entropy, bad bytes."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtllava.compress import coding
from qtllava.compress.coding import (CodingError, ans_decode, ans_encode, empirical_entropy, index_bits, pack_indices,
                                     unpack_indices)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def index_arrays(draw, max_rows=24, max_cols=40):
    """(rows, cols) uint8 indices in [0, L): uniform, skewed (bell-shaped), constant or per-channel shifted."""
    levels = draw(st.integers(2, 256))
    rows, cols = draw(st.integers(0, max_rows)), draw(st.integers(1, max_cols))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["uniform", "bell", "const", "channels"]))
    if kind == "uniform":
        idx = rng.integers(0, levels, (rows, cols))
    elif kind == "const":
        idx = np.full((rows, cols), draw(st.integers(0, levels - 1)))
    else:
        z = rng.standard_normal((rows, cols)) / 3
        if kind == "channels":
            z = z * rng.uniform(0.1, 1.0, cols) + rng.uniform(-0.6, 0.6, cols)
        idx = np.rint((np.clip(z, -1, 1) + 1) * (levels - 1) / 2)
    return idx.astype(np.uint8), levels


def gaussian_indices(rows, cols, levels, seed=0):
    z = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    zn = np.clip((z - z.mean(1, keepdims=True)) / (3 * z.std(1, keepdims=True)), -1, 1)
    return np.rint((zn + 1) * (levels - 1) / 2).astype(np.uint8)


def test_index_bits():
    assert [index_bits(L) for L in (2, 3, 4, 5, 8, 9, 16, 17, 255, 256)] == [1, 2, 2, 3, 3, 4, 4, 5, 8, 8]
    with pytest.raises(ValueError):
        index_bits(1)


@FAST
@given(index_arrays())
def test_pack_round_trip_and_size(case):
    idx, levels = case
    data = pack_indices(idx, levels)
    assert len(data) == math.ceil(idx.size * index_bits(levels) / 8)
    assert np.array_equal(unpack_indices(data, levels, idx.size).reshape(idx.shape), idx)


@pytest.mark.parametrize("levels", [2, 3, 4, 5, 6, 7, 8, 9, 16, 32, 33, 64, 65, 128, 200, 256, 300, 65536])
def test_pack_every_width(levels):
    idx = np.random.default_rng(levels).integers(0, levels, 1001)
    data = pack_indices(idx, levels)
    assert len(data) == math.ceil(1001 * index_bits(levels) / 8)
    assert np.array_equal(unpack_indices(data, levels, 1001), idx)


def test_pack_bit_order_is_little_endian():
    assert pack_indices(np.array([1, 2, 3]), 4) == bytes([0b00111001])
    assert pack_indices(np.array([5, 1, 7]), 8) == bytes([0b11001101, 0b00000001])


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="indices must lie"):
        pack_indices(np.array([0, 4]), 4)
    with pytest.raises(CodingError, match="need 1 bytes"):
        unpack_indices(b"\x00\x00", 4, 3)
    with pytest.raises(CodingError, match="padding bits"):
        unpack_indices(bytes([0b11000000]), 4, 3)  # 4th index sits in the padding
    with pytest.raises(CodingError, match=">= L"):
        unpack_indices(bytes([0b11]), 3, 1)


@FAST
@given(index_arrays(), st.sampled_from(["auto", 1, 4]))
def test_ans_round_trip(case, groups):
    idx, levels = case
    payload, side = ans_encode(idx, levels, groups=groups)
    out = ans_decode(payload, side, levels, idx.shape)
    assert out.shape == idx.shape and np.array_equal(out, idx)
    # never more than one byte over `pack` (the raw fallback costs one mode byte)
    assert len(payload) + len(side) <= math.ceil(idx.size * index_bits(levels) / 8) + 2


@pytest.mark.parametrize("levels", [2, 3, 4, 7, 16, 256])
def test_ans_edge_cases(levels):
    for idx in (np.zeros((0, 5), np.uint8), np.zeros((3, 0), np.uint8), np.array([[levels - 1]], np.uint8),
                np.full((50, 7), levels // 2, np.uint8), np.full(1000, levels - 1, np.uint8)):
        payload, side = ans_encode(idx, levels)
        assert np.array_equal(ans_decode(payload, side, levels, idx.shape), idx)
    const = np.full((50, 7), levels - 1, np.uint8)
    payload, side = ans_encode(const, levels)
    assert payload == b"" and len(side) == 2  # one symbol everywhere costs two bytes, whatever the count


def test_ans_close_to_entropy_on_large_gaussian():
    for levels in (3, 4, 8, 16):
        idx = gaussian_indices(400, 512, levels, seed=levels)
        payload, side = ans_encode(idx, levels)
        bits = (len(payload) + len(side)) * 8 / idx.size
        h = empirical_entropy(idx, levels)
        assert side[0] == coding.MODE_POOLED  # iid channels: groups do not pay
        assert h <= bits <= 1.01 * h, (levels, h, bits)
        assert np.array_equal(ans_decode(payload, side, levels, idx.shape), idx)


def test_ans_channel_groups_pay_on_skewed_channels():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((300, 256)) / 3 * rng.uniform(0.1, 1.0, 256) + rng.uniform(-0.5, 0.5, 256)
    idx = np.rint((np.clip(z, -1, 1) + 1) * 1.5).astype(np.uint8)
    pooled = sum(map(len, ans_encode(idx, 4, groups=1)))
    payload, side = ans_encode(idx, 4)
    assert side[0] == coding.MODE_GROUPED
    assert len(payload) + len(side) < 0.9 * pooled
    assert np.array_equal(ans_decode(payload, side, 4, idx.shape), idx)


def test_ans_raw_fallback_for_uniform_binary():
    idx = np.random.default_rng(0).integers(0, 2, (64, 64)).astype(np.uint8)
    payload, side = ans_encode(idx, 2)
    assert side == bytes([coding.MODE_RAW]) and payload == pack_indices(idx, 2)


def test_ans_detects_wrong_count_and_corruption():
    idx = gaussian_indices(40, 64, 4)
    payload, side = ans_encode(idx, 4, groups=1)
    for shape in ((41, 64), (39, 64), (40, 65)):
        with pytest.raises(CodingError):
            ans_decode(payload, side, 4, shape)
    with pytest.raises(CodingError):
        ans_decode(payload[:-4], side, 4, idx.shape)
    with pytest.raises(CodingError, match="whole number"):
        ans_decode(payload[:-1], side, 4, idx.shape)
    with pytest.raises(CodingError):
        ans_decode(payload, side[:-1], 4, idx.shape)
    with pytest.raises(CodingError, match="unknown mode"):
        ans_decode(payload, bytes([9]) + side[1:], 4, idx.shape)
    with pytest.raises(CodingError, match="empty"):
        ans_decode(payload, b"", 4, idx.shape)


def test_ans_detects_wrong_count_with_free_trailing_symbols():
    # indices equal to the lowest used symbol cost nothing at the bottom of an ANS stack; the sentinel catches it
    idx = np.zeros((10, 8), np.uint8)
    idx[0, 0] = 1
    payload, side = ans_encode(idx, 4, groups=1)
    assert side[0] == coding.MODE_POOLED
    assert np.array_equal(ans_decode(payload, side, 4, idx.shape), idx)
    with pytest.raises(CodingError):
        ans_decode(payload, side, 4, (11, 8))


def test_empirical_entropy():
    assert empirical_entropy(np.array([0, 1, 2, 3]), 4) == pytest.approx(2.0)
    assert empirical_entropy(np.zeros(10, np.uint8), 4) == 0.0
    assert empirical_entropy(np.array([3, 1])) == pytest.approx(0.8112781244591328)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(levels=st.integers(2, 32), n_rows=st.integers(2, 200), n_cols=st.integers(2, 64), seed=st.integers(0, 2**32 - 1))
def test_ans_grouped_round_trip_and_never_much_worse_than_pooled(levels, n_rows, n_cols, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_rows, n_cols)) / 3 * rng.uniform(0.1, 1.0, n_cols) + rng.uniform(-0.6, 0.6, n_cols)
    idx = np.rint((np.clip(z, -1, 1) + 1) * (levels - 1) / 2).astype(np.uint8)
    payload, side = ans_encode(idx, levels)
    assert np.array_equal(ans_decode(payload, side, levels, idx.shape), idx)
    pooled = sum(map(len, ans_encode(idx, levels, groups=1)))
    assert len(payload) + len(side) <= pooled + max(8, pooled // 100)


# --- row dictionary (mode 4) ---------------------------------------------------------------------------------


def repeated_rows(n_rows, n_distinct, cols, levels, seed=0, near=0.0):
    """Rows drawn from `n_distinct` Gaussian code rows (token embeddings, white canvas patches); with `near` > 0,
    each drawn row has that fraction of its channels re-drawn (near-duplicates, as image patches)."""
    rng = np.random.default_rng(seed)
    base = gaussian_indices(n_distinct, cols, levels, seed=seed)
    idx = base[rng.integers(0, n_distinct, n_rows)].copy()
    if near:
        hit = rng.random(idx.shape) < near
        idx[hit] = rng.integers(0, levels, int(hit.sum()))
    return idx


@st.composite
def row_arrays(draw):
    """(rows, cols) or (batch, rows, cols) indices whose rows repeat: a few distinct rows, picked at random, some
    perturbed; constant rows and constant channels too."""
    levels = draw(st.integers(2, 256))
    rows, cols = draw(st.integers(0, 80)), draw(st.integers(1, 48))
    distinct = draw(st.integers(1, max(1, rows)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["uniform", "bell", "const_rows", "near"]))
    if kind == "uniform":
        base = rng.integers(0, levels, (distinct, cols))
    elif kind == "const_rows":
        base = np.repeat(rng.integers(0, levels, (distinct, 1)), cols, axis=1)
    else:
        z = np.clip(rng.standard_normal((distinct, cols)) / 3, -1, 1)
        base = np.rint((z + 1) * (levels - 1) / 2)
    idx = base[rng.integers(0, distinct, rows)] if rows else np.zeros((0, cols))
    if kind == "near" and rows:
        hit = rng.random(idx.shape) < 0.05
        idx[hit] = rng.integers(0, levels, int(hit.sum()))
    idx = idx.astype(np.uint8)
    if draw(st.booleans()) and rows % 2 == 0:
        idx = idx.reshape(2, rows // 2, cols)
    return idx, levels


@FAST
@given(row_arrays(), st.sampled_from(["auto", 1]))
def test_ans_row_dictionary_round_trip(case, groups):
    idx, levels = case
    payload, side = ans_encode(idx, levels, groups=groups)
    out = ans_decode(payload, side, levels, idx.shape)
    assert out.shape == idx.shape and np.array_equal(out, idx)
    size = len(payload) + len(side)
    assert size <= sum(map(len, ans_encode(idx, levels, groups=groups, rows=False)))  # never worse than symbols
    assert size <= math.ceil(idx.size * index_bits(levels) / 8) + 2


@pytest.mark.parametrize("levels", [2, 3, 4, 16, 33, 256])
def test_ans_row_dictionary_edge_cases(levels):
    row = gaussian_indices(1, 300, levels, seed=levels)
    cases = {
        "all rows equal": np.repeat(row, 40, axis=0),
        "all distinct": gaussian_indices(40, 300, levels, seed=1),
        "one row": row,
        "empty": np.zeros((0, 300), np.uint8),
        "no channels": np.zeros((5, 0), np.uint8),
        "one channel": np.repeat(row[:, :1], 200, axis=0),
        "two copies": np.concatenate([row, row]),
        "3-D": repeated_rows(120, 7, 64, levels, seed=2).reshape(4, 30, 64),
        "near": repeated_rows(200, 5, 64, levels, seed=3, near=0.02),
    }
    for name, idx in cases.items():
        payload, side = ans_encode(idx, levels)
        assert np.array_equal(ans_decode(payload, side, levels, idx.shape), idx), name
    payload, side = ans_encode(cases["all rows equal"], levels)  # the dictionary, or per-channel models at L = 2
    assert len(payload) + len(side) < sum(map(len, ans_encode(row, levels))) + 24  # ~ one row plus a few bytes


@pytest.mark.parametrize("levels", [2, 4, 8, 16])
def test_ans_beats_zstd_on_repeated_rows(levels):
    zstandard = pytest.importorskip("zstandard")
    zc = zstandard.ZstdCompressor(level=3)
    cases = {"tokens": repeated_rows(500, 60, 256, levels, seed=levels),  # text: rows are a function of the token
             "patches": repeated_rows(512, 12, 256, levels, seed=levels, near=0.01)}  # near-duplicate image rows
    for name, idx in cases.items():
        payload, side = ans_encode(idx, levels)
        assert side[0] == coding.MODE_ROWS, name
        assert np.array_equal(ans_decode(payload, side, levels, idx.shape), idx)
        z = len(zc.compress(pack_indices(idx, levels)))
        assert len(payload) + len(side) < z, (name, len(payload) + len(side), z)
        assert len(payload) + len(side) < 0.5 * sum(map(len, ans_encode(idx, levels, rows=False)))


def test_ans_row_dictionary_skipped_on_distinct_rows():
    idx = gaussian_indices(728, 1280, 4)
    assert not coding._rows_may_repeat(idx)
    payload, side = ans_encode(idx, 4)
    assert side[0] in (coding.MODE_POOLED, coding.MODE_GROUPED)


def test_ans_row_dictionary_detects_wrong_shape_and_corruption():
    for idx, levels in ((repeated_rows(300, 20, 64, 4, seed=5), 4),  # context variant
                        (repeated_rows(300, 20, 64, 100, seed=6), 100)):  # unique rows coded as symbols
        payload, side = ans_encode(idx, levels)
        assert side[0] == coding.MODE_ROWS
        for shape in ((301, 64), (299, 64), (300, 65), (300 * 64,)):
            with pytest.raises(CodingError):
                ans_decode(payload, side, levels, shape)
        with pytest.raises(CodingError):
            ans_decode(payload[:-4], side, levels, idx.shape)
        with pytest.raises(CodingError):
            ans_decode(payload, side[:-1], levels, idx.shape)
        with pytest.raises(CodingError):
            ans_decode(payload, side + b"\x00", levels, idx.shape)
