"""Cache integrity through the real ``spar cache verify [--repair]`` command on a real precomputed cache.

Unit-level detection of each corruption is in tests/pipeline/test_cache.py (flipped byte, truncated store,
missing manifest/marker, spec not matching its directory) and a flipped-byte repair in
tests/pipeline/test_precompute.py. Here all of them hit one real cache at once and go through the CLI: each is
reported on its own line naming the shard and the problem, ``--repair`` recomputes exactly the bad shards and the
result is bit-identical to the cache before the damage; a ``spec.json`` that lies about the teacher is reported and
never "repaired" into a cache that mixes two teachers. Readers (the training stream) never serve damaged rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.reader import open_cache
from pipeline.cache.spec import CacheError
from tests.reliability.conftest import assert_user_error, cache_features, run_main, shard_attempts


@pytest.fixture(autouse=True)
def _ray(ray_up):
    return ray_up


@pytest.fixture
def cache_copy(rel_reference_cache, tmp_path) -> str:
    """A private copy of the reference cache (same fingerprint directory name)."""
    dst = tmp_path / "caches" / Path(rel_reference_cache).name
    shutil.copytree(rel_reference_cache, dst)
    return str(dst)


def _chunks(path: str, shard: int) -> list[Path]:
    d = Path(path) / "shards" / f"shard-{shard:06d}.zarr" / "features" / "c"
    return sorted(p for p in d.rglob("*") if p.is_file())


def _flip_byte(f: Path, where: float = 0.5) -> None:
    raw = bytearray(f.read_bytes())
    raw[int(len(raw) * where)] ^= 0x04
    f.write_bytes(bytes(raw))


def test_four_kinds_of_damage_reported_per_shard_and_repaired(cache_copy, capsys):
    before = cache_features(cache_copy)
    attempts = shard_attempts(cache_copy)
    _flip_byte(_chunks(cache_copy, 0)[0])  # bit rot in a chunk
    f = _chunks(cache_copy, 1)[-1]
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])  # truncated shard file
    (Path(cache_copy) / "shards" / "shard-000002.zarr" / "manifest.json").unlink()  # deleted manifest
    # shard 3 untouched

    r = run_main(["cache", "verify", cache_copy], capsys)
    assert r.rc == 1
    bad = [ln for ln in r.out.splitlines() if ln.startswith("BAD ")]
    assert len(bad) == 3, r.out
    assert bad[0].startswith("BAD shard-000000: ") and ("checksum" in bad[0] or "corrupt" in bad[0])
    assert bad[1].startswith("BAD shard-000001: store truncated or corrupt")
    assert bad[2] == "BAD shard-000002: manifest missing"
    assert "--repair" in r.err

    # readers refuse the damaged shards instead of serving them
    c = open_cache(cache_copy)
    assert not c.shard_complete(2)
    key1 = c.shard_keys(1)[-1]
    with pytest.raises(Exception):  # noqa: B017 - zstd decode error or checksum mismatch, never data
        c.features(key1, verify=True)

    r = run_main(["cache", "verify", cache_copy, "--repair", "--workers", "2"], capsys)
    assert r.rc == 0, r.out + r.err
    assert "repaired" in r.out and "3 shard(s) recomputed" in r.out
    now = shard_attempts(cache_copy)
    assert now["shard-000003.done"] == attempts["shard-000003.done"]  # the good shard was not recomputed
    assert all(now[k] != attempts[k] for k in ("shard-000000.done", "shard-000001.done", "shard-000002.done"))
    after = cache_features(cache_copy)
    assert after.keys() == before.keys()
    for k in before:  # same teacher, same pixels, float32 forward: the repaired rows equal the lost ones
        np.testing.assert_allclose(after[k], before[k], rtol=2e-3, atol=2e-3 * float(np.abs(before[k]).max()))
    assert run_main(["cache", "verify", cache_copy], capsys).rc == 0


@pytest.mark.parametrize("lie", ["backbone", "weights_id", "fingerprint_too"])
def test_spec_lying_about_the_teacher_is_reported_and_not_repaired(cache_copy, capsys, lie):
    spec_path = Path(cache_copy) / "spec.json"
    doc = json.loads(spec_path.read_text())
    if lie == "backbone":
        doc["spec"]["backbone"] = "tiny-clip-224"
    elif lie == "weights_id":
        doc["spec"]["weights_id"] = "random:tiny-clip-64:seed9"
    else:  # a careful liar also rewrites the recorded fingerprint: the directory name still gives it away
        from pipeline.cache.spec import CacheSpec

        doc["spec"]["weights_id"] = "random:tiny-clip-64:seed9"
        doc["fingerprint"] = CacheSpec.from_dict(doc["spec"]).fingerprint()
    spec_path.write_text(json.dumps(doc))
    data_before = {p: p.read_bytes() for p in Path(cache_copy).rglob("*") if p.is_file() and p != spec_path}

    r = run_main(["cache", "verify", cache_copy], capsys)
    assert r.rc == 1
    bad = [ln for ln in r.out.splitlines() if ln.startswith("BAD ")]
    assert bad and all(ln.startswith("BAD spec.json: ") for ln in bad), r.out
    assert any("directory name" in ln or "records fingerprint" in ln for ln in bad)

    r = run_main(["cache", "verify", cache_copy, "--repair"], capsys)
    assert_user_error(r, "spec.json does not match the cache", "cannot repair")
    after = {p: p.read_bytes() for p in Path(cache_copy).rglob("*") if p.is_file() and p != spec_path}
    assert after == data_before  # nothing was invalidated or rewritten


def _first_key(path: str) -> str:
    return open_cache(path).shard_keys(0)[0]


def _stream_targets(images: str, cache: str) -> dict[str, np.ndarray]:
    from pipeline.train.stream import PairedStream, make_loader

    n = len(open_cache(cache).keys())
    stream = PairedStream(images, cache, seed=0, rank=0, world_size=1, patch_size=16, num_batches=n)
    out = {}
    for item in make_loader(stream, 0):
        for k, t in zip(item["keys"], item["target"], strict=True):
            out[k] = t.float().numpy()
    return out


def test_training_stream_never_serves_damaged_rows(cache_copy, rel_imageset):
    """Single-byte flips all over a chunk (before cache.py verified reads, ~90% of them still decoded and changed
    the rows silently): the training stream either refuses with an error naming the shard or key, or serves the
    exact original rows. Never a silently different target."""
    from pipeline.train.stream import StreamError

    key = _first_key(cache_copy)
    good = np.asarray(open_cache(cache_copy).features(key), dtype=np.float32)
    f = _chunks(cache_copy, 0)[0]
    orig = f.read_bytes()
    refused = 0
    for pos in range(len(orig) // 2, len(orig) - 1, max(1, len(orig) // 24)):
        raw = bytearray(orig)
        raw[pos] ^= 0x01
        f.write_bytes(bytes(raw))
        try:
            served = _stream_targets(rel_imageset, cache_copy)
        except (StreamError, CacheError) as e:
            assert "shard-000000" in str(e) or key in str(e), e
            refused += 1
            continue
        np.testing.assert_array_equal(served[key], good, err_msg=f"damaged target of {key!r} served silently")
    f.write_bytes(orig)
    assert refused > 0


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_reader_error_for_a_damaged_chunk_names_the_shard(cache_copy, damage):
    f = _chunks(cache_copy, 1)[0]
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:20])
    else:
        f.write_bytes(b"\x00garbage" * 50)
    c = open_cache(cache_copy)
    key = c.shard_keys(1)[0]
    with pytest.raises(CacheError, match=f"shard-000001 key '{key}': store truncated or corrupt"):
        c.features(key)
