"""The int8 cache codec: per-token absmax quantisation, real Zarr round trips, checksums over rows and scales,
verify, and the fingerprints of float16 caches (unchanged by the codec's introduction).

References are written here: a naive per-row quantise/dequantise loop, hand-computed error bounds, and literal
fingerprints computed with the cache module as it was before the int8 codec existed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import zarr

import pipeline.cache.spec as spec_mod
import pipeline.cache.writer as writer_mod
from pipeline.cache.maintenance import verify_cache
from pipeline.cache.reader import open_cache
from pipeline.cache.spec import CacheError, CacheSpec, ShardEntry
from pipeline.cache.writer import ShardWriter, write_spec

DIM = 40
SPEC16 = CacheSpec(
    backbone="maskclip-vit-b16",
    pretrained=None,
    weights_id="openclip:ViT-B-16:openai",
    crop=224,
    stride=24,
    readout="maskclip",
    dtype="float16",
    imageset_fingerprint="0123456789abcdef" * 4,
    autocast="bf16",
)
ITEMS = [("a", 5, 7), ("b", 9, 4), ("c", 3, 3), ("z", 2, 2)]


def test_float16_fingerprints_are_those_computed_before_the_int8_codec():
    # literals computed with pipeline/cache/store.py at commit 0ade145 (before int8 existed)
    assert SPEC16.fingerprint() == "14c2f632e43318a5c18d7425347eee5f53580aa6f58e02b77eccaf1a3d75c67c"
    fp32_forward = dataclasses.replace(SPEC16, autocast="none")
    assert fp32_forward.fingerprint() == "1d78c76c108a7e98364130b6b6c5e7fc3d0c478b9071759c9993aa928a7b9c90"
    assert dataclasses.replace(SPEC16, dtype="int8").fingerprint() != SPEC16.fingerprint()


def naive_roundtrip(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row by row, element by element: s = max|x|/127, q = round-half-even(x/s), x' = q*s."""
    q = np.zeros(x.shape, np.int8)
    s = np.zeros(x.shape[0], np.float32)
    for i, row in enumerate(x.astype(np.float64)):
        m = max(abs(v) for v in row)
        s[i] = np.float32(m / 127.0)
        for j, v in enumerate(row):
            q[i, j] = 0 if s[i] == 0 else int(np.clip(round(v / float(s[i])), -127, 127))
    return q, s


def features(seed: int, h: int, w: int) -> np.ndarray:
    """Teacher-like features: a few large channels (outliers) on a normal background, one all-zero token."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((h, w, DIM)).astype(np.float32)
    f[..., 3] *= 20.0
    f[0, 0] = 0.0
    return f


def make(path: Path, dtype: str, items=ITEMS, seed=0) -> tuple[str, dict[str, np.ndarray]]:
    spec = dataclasses.replace(SPEC16, dtype=dtype)
    p = str(path / spec.fingerprint())
    write_spec(p, spec, {"num_shards": 1, "num_images": len(items), "dim": DIM, "patch_size": 16}, {})
    entries = [ShardEntry(k, 0, h, w, h * 16, w * 16, "0" * 64) for k, h, w in items]
    wr = ShardWriter(p, 0, entries, dim=DIM, dtype=dtype)
    feats = {k: features(seed + i, h, w) for i, (k, h, w) in enumerate(items)}
    for k, f in feats.items():
        wr.add(k, f)
    assert wr.commit() == "written"
    return p, feats


@pytest.fixture
def small_chunks(monkeypatch):
    """Inner chunks of 16 rows, 3 per Zarr shard: images straddle chunk and shard boundaries."""
    monkeypatch.setattr(writer_mod, "CHUNK_BYTES", 16 * DIM)
    monkeypatch.setattr(writer_mod, "CHUNKS_PER_SHARD", 3)


def test_quantize_matches_a_naive_loop_and_its_error_bound():
    x = features(3, 6, 5).reshape(-1, DIM)
    q, s = spec_mod.quantize_int8(x)
    nq, ns = naive_roundtrip(x)
    np.testing.assert_array_equal(s, ns)
    assert (
        np.abs(q.astype(int) - nq.astype(int)).max() <= 1
    )  # x/s in float32 vs float64 may round differently
    assert (q != nq).mean() < 1e-3
    back = spec_mod.dequantize_int8(q, s)
    assert back.dtype == np.float32
    err = np.abs(back - x)
    assert (err <= ns[:, None] * 0.5 * (1 + 1e-5) + 1e-7).all()  # half a step per element
    assert np.abs(q).max(axis=1)[ns > 0].min() == 127  # the largest element of each row is exactly +-127
    assert (back[0] == 0).all()  # the all-zero token


def test_round_trip_through_real_zarr_returns_float32_within_the_bound(tmp_path, small_chunks):
    path, feats = make(tmp_path, "int8")
    c = open_cache(path)
    assert c.spec.dtype == "int8"
    for k, f in feats.items():
        got = c.features(k)
        assert got.dtype == np.float32 and got.shape == f.shape
        _, ns = naive_roundtrip(f.reshape(-1, DIM))
        bound = (ns[:, None] * 0.5 * (1 + 1e-5) + 1e-7).reshape(f.shape[0], f.shape[1], 1)
        assert (np.abs(got - f) <= bound).all(), k
    assert [k for k, _ in c.iter_shard(0)] == [k for k, _, _ in ITEMS]
    store = Path(path) / "shards" / "shard-000000.zarr"
    assert zarr.open_array(zarr.storage.LocalStore(store), path="features", mode="r").dtype == np.int8
    scales = zarr.open_array(zarr.storage.LocalStore(store), path="scales", mode="r")
    assert scales.shape == (sum(h * w for _, h, w in ITEMS),) and scales.dtype == np.float32
    assert verify_cache(path)[1] == []


def test_int8_store_is_at_most_a_quarter_of_raw_float32(tmp_path):
    items = [("a", 40, 30), ("b", 32, 32)]
    path, feats = make(tmp_path, "int8", items)
    data = sum(f.stat().st_size for f in (Path(path) / "shards").rglob("*") if f.is_file())
    raw = sum(f.size * 4 for f in feats.values())
    assert data <= 0.26 * raw, data / raw  # int8 + a float32 scale per 40-d row: (40 + 4) / 160 = 0.275 raw,
    # less after zstd; at D = 512 the scales add 0.8 %


def test_verify_catches_a_damaged_scale_and_a_damaged_row(tmp_path, small_chunks):
    path, feats = make(tmp_path, "int8")
    store = zarr.storage.LocalStore(Path(path) / "shards" / "shard-000000.zarr")
    s = zarr.open_array(store, path="scales", mode="r+")
    s[40] = s[40] * 2  # a valid chunk with a wrong scale for a row of key 'b' (rows 35..70)
    assert [str(p) for p in verify_cache(path)[1]] == ["shard-000000: bad checksum for key 'b'"]
    c = open_cache(path)
    with pytest.raises(CacheError, match="key 'b': features fail their checksum"):
        c.features("b")
    s[40] = s[40] / 2
    assert verify_cache(path)[1] == []
    f = zarr.open_array(store, path="features", mode="r+")
    f[1, 0] = np.int8(-f[1, 0] if f[1, 0] else 5)  # key 'a'
    assert [str(p) for p in verify_cache(path)[1]] == ["shard-000000: bad checksum for key 'a'"]


def test_non_finite_features_are_refused_by_the_int8_writer(tmp_path):
    spec = dataclasses.replace(SPEC16, dtype="int8")
    p = str(tmp_path / spec.fingerprint())
    write_spec(p, spec, {"num_shards": 1, "num_images": 1, "dim": DIM, "patch_size": 16}, {})
    wr = ShardWriter(p, 0, [ShardEntry("a", 0, 2, 2, 32, 32, "0" * 64)], dim=DIM, dtype="int8")
    f = features(0, 2, 2)
    f[1, 1, 1] = np.nan
    with pytest.raises(CacheError, match="non-finite"):
        wr.add("a", f)
    wr.abort()
