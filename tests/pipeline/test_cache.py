"""Teacher cache format: fingerprint, real Zarr v3 round trips, commit protocol, verify, pairing, ls/rm/gc.

The features written here are seeded random arrays (the teacher itself is exercised in test_precompute.py);
the references are computed independently in the tests (hashlib over the float16 bytes, numpy casts).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

import pipeline.cache.writer as writer_mod
from pipeline.cache.cli import add_cli
from pipeline.cache.layout import ShardFiles
from pipeline.cache.maintenance import gc_caches, list_caches, summarize, verify_cache
from pipeline.cache.reader import open_cache
from pipeline.cache.spec import CacheError, CachePairingError, CacheSpec, ShardEntry
from pipeline.cache.writer import ShardWriter, write_spec
from pipeline.cli import resolve_handler
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest

SPEC = CacheSpec(
    backbone="tiny-clip-64",
    pretrained="/somewhere/weights.safetensors",
    weights_id="sha256:" + "ab" * 32,
    crop=64,
    stride=24,
    readout="maskclip",
    dtype="float16",
    imageset_fingerprint="cd" * 32,
)
DIM = 48


def test_fingerprint_is_sha256_of_hand_written_canonical_json():
    text = (
        '{"autocast":"bf16","backbone":"tiny-clip-64","crop":64,"dtype":"float16","format_version":1,'
        f'"imageset_fingerprint":"{"cd" * 32}","readout":"maskclip","stride":24,"weights_id":"sha256:{"ab" * 32}"}}'
    )
    assert SPEC.fingerprint() == hashlib.sha256(text.encode()).hexdigest()


def test_fingerprint_changes_with_every_identity_field_and_not_with_pretrained():
    base = SPEC.fingerprint()
    changed = {
        "backbone": "tiny-clip-224",
        "weights_id": "random:tiny-clip-64:seed1",
        "crop": 48,
        "stride": 32,
        "readout": "siglip2-pool-bypass",
        "dtype": "float32",
        "imageset_fingerprint": "ef" * 32,
        "autocast": "none",
        "format_version": 2,
    }
    assert set(changed) | {"pretrained"} == {f.name for f in dataclasses.fields(CacheSpec)}
    seen = {base}
    for name, value in changed.items():
        fp = dataclasses.replace(SPEC, **{name: value}).fingerprint()
        assert fp not in seen, name
        seen.add(fp)
    # the same weights loaded from another path (or by tag) are the same cache
    assert dataclasses.replace(SPEC, pretrained="/elsewhere/copy.safetensors").fingerprint() == base
    assert dataclasses.replace(SPEC, pretrained=None).fingerprint() == base


def test_bad_spec_values_are_refused():
    with pytest.raises(CacheError, match="dtype"):
        dataclasses.replace(SPEC, dtype="bfloat16")
    with pytest.raises(CacheError, match="crop"):
        dataclasses.replace(SPEC, crop=0)


# ------------------------------------------------------------------------------------------ helpers


def make_cache(
    root: Path, entries_per_shard: list[list[tuple[str, int, int]]], spec: CacheSpec = SPEC
) -> str:
    """spec.json for a cache with the given shards (key, h, w); returns its path."""
    path = str(root / spec.fingerprint())
    layout = {
        "num_shards": len(entries_per_shard),
        "num_images": sum(map(len, entries_per_shard)),
        "dim": DIM,
        "patch_size": 16,
    }
    write_spec(path, spec, layout, {"images": None})
    return path


def entries_for(items: list[tuple[str, int, int]]) -> list[ShardEntry]:
    return [
        ShardEntry(k, 0, h, w, h * 16, w * 16, hashlib.sha256(k.encode()).hexdigest()) for k, h, w in items
    ]


def random_feats(items: list[tuple[str, int, int]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((h, w, DIM)).astype(np.float32) * 3 for k, h, w in items}


def write_shard(path: str, shard: int, items, feats, before_seal=None) -> tuple[ShardWriter, str]:
    """Write and commit one shard; ``before_seal("placed")`` runs after the store is placed, before the marker."""
    w = ShardWriter(path, shard, entries_for(items), dim=DIM, dtype="float16")
    if before_seal is not None:
        seal = w._seal

        def hooked(*args):
            before_seal("placed")
            return seal(*args)

        w._seal = hooked
    for k, _, _ in items:
        w.add(k, feats[k])
    return w, w.commit()


ITEMS0 = [("a", 5, 7), ("b", 9, 4), ("c", 3, 3), ("d", 11, 6)]
ITEMS1 = [("e", 4, 4), ("f", 6, 8)]


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny Zarr chunks (16 rows) and shards (3 chunks) so a shard store holds several of each."""
    monkeypatch.setattr(writer_mod, "CHUNK_BYTES", 16 * DIM * 2)
    monkeypatch.setattr(writer_mod, "CHUNKS_PER_SHARD", 3)


def chunk_files(store: Path) -> list[Path]:
    return sorted(p for p in (store / "features" / "c").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_through_real_zarr_with_several_chunks_and_shards(tmp_path, small_chunks):
    path = make_cache(tmp_path, [ITEMS0, ITEMS1])
    f0, f1 = random_feats(ITEMS0, 0), random_feats(ITEMS1, 1)
    assert write_shard(path, 0, ITEMS0, f0)[1] == "written"
    c = open_cache(path)
    assert c.shard_complete(0) and not c.shard_complete(1) and not c.is_complete()
    assert write_shard(path, 1, ITEMS1, f1)[1] == "written"

    c = open_cache(path)
    assert c.is_complete() and c.num_shards == 2 and c.fingerprint == SPEC.fingerprint()
    assert c.spec == SPEC and c.spec.pretrained == SPEC.pretrained  # the hint is kept in spec.json
    for k, want in {**f0, **f1}.items():
        got = c.features(k, verify=True)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, want.astype(np.float16))
    assert [k for k, _ in c.iter_shard(0)] == ["a", "b", "c", "d"] == c.shard_keys(0)

    # the stored layout: one 2-D array, rows contiguous per image in order, sharded + zstd, ~CHUNK_BYTES chunks
    store = Path(path) / "shards" / "shard-000000.zarr"
    arr = zarr.open_array(zarr.storage.LocalStore(store, read_only=True), path="features", mode="r")
    rows = sum(h * w for _, h, w in ITEMS0)
    assert arr.shape == (rows, DIM) and arr.chunks == (16, DIM) and arr.shards == (48, DIM)
    expected = np.concatenate([f0[k].reshape(-1, DIM) for k, _, _ in ITEMS0]).astype(np.float16)
    np.testing.assert_array_equal(arr[:], expected)
    meta = json.loads((store / "features" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    codec = meta["codecs"][0]
    assert codec["name"] == "sharding_indexed"
    assert any(c["name"] == "zstd" for c in codec["configuration"]["codecs"])
    assert len(chunk_files(store)) == -(-rows // 48)  # one object per Zarr shard

    # manifest checksums are sha256 of the stored float16 bytes of each image's rows
    manifest = json.loads((store / "manifest.json").read_text())
    offset = 0
    for e, (k, h, w) in zip(manifest["entries"], ITEMS0, strict=True):
        assert (e["key"], e["offset"], e["h"], e["w"]) == (k, offset, h, w)
        want = hashlib.sha256(f0[k].astype("<f2").reshape(-1, DIM).tobytes()).hexdigest()
        assert e["checksum"] == want
        offset += h * w


def test_default_chunks_are_about_one_megabyte():
    assert writer_mod.chunk_rows_for(512, "float16") * 512 * 2 == 1 << 20
    assert writer_mod.chunk_rows_for(768, "float16") * 768 * 2 <= 1 << 20


def test_nothing_in_a_cache_is_a_pickle(tmp_path):
    path = make_cache(tmp_path, [ITEMS0])
    write_shard(path, 0, ITEMS0, random_feats(ITEMS0, 0))
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    assert files
    for p in files:
        head = p.read_bytes()[:2]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), p
        assert p.suffix in (".json", ".done", "") or p.parent.name.isdigit(), p


def test_writer_refuses_wrong_order_or_shape(tmp_path):
    path = make_cache(tmp_path, [ITEMS0])
    w = ShardWriter(path, 0, entries_for(ITEMS0), dim=DIM, dtype="float16")
    with pytest.raises(CacheError, match="expected key 'a'"):
        w.add("b", np.zeros((9, 4, DIM)))
    with pytest.raises(CacheError, match=r"features \(5, 6, 48\)"):
        w.add("a", np.zeros((5, 6, DIM)))
    w.add("a", np.zeros((5, 7, DIM)))
    with pytest.raises(CacheError, match="3 images not written"):
        w.commit()
    w.abort()
    assert not list((Path(path) / "shards").glob("*.tmp-*"))


# ------------------------------------------------------------------------------------------ commit protocol


def test_unfinished_shard_is_invisible_and_gc_removes_its_leftovers(tmp_path):
    path = make_cache(tmp_path, [ITEMS0])
    feats = random_feats(ITEMS0, 0)
    w = ShardWriter(path, 0, entries_for(ITEMS0), dim=DIM, dtype="float16")
    for k, _, _ in ITEMS0[:2]:
        w.add(k, feats[k])  # the process "dies" here: no commit
    c = open_cache(path)
    assert not c.shard_complete(0)
    with pytest.raises(CacheError, match="no key 'a'"):
        c.features("a")
    with pytest.raises(CacheError, match="not complete"):
        c.shard_keys(0)
    leftovers = list((Path(path) / "shards").glob("shard-000000.zarr.tmp-*"))
    assert len(leftovers) == 1
    assert gc_caches(str(tmp_path), older_than_s=3600) == []  # young: may belong to a running precompute
    assert gc_caches(str(tmp_path), older_than_s=0) == [str(leftovers[0])]
    assert not leftovers[0].exists() and (Path(path) / "spec.json").exists()


def test_second_finisher_discards_its_copy(tmp_path):
    path = make_cache(tmp_path, [ITEMS0])
    fa, fb = random_feats(ITEMS0, 1), random_feats(ITEMS0, 2)
    wa = ShardWriter(path, 0, entries_for(ITEMS0), dim=DIM, dtype="float16")
    wb = ShardWriter(path, 0, entries_for(ITEMS0), dim=DIM, dtype="float16")
    for k, _, _ in ITEMS0:
        wa.add(k, fa[k])
        wb.add(k, fb[k])
    assert wa.commit() == "written"
    assert wb.commit() == "already-complete"
    c = open_cache(path)
    np.testing.assert_array_equal(c.features("b"), fa["b"].astype(np.float16))
    assert sorted(p.name for p in (Path(path) / "shards").iterdir()) == [
        "shard-000000.done",
        "shard-000000.zarr",
    ]
    assert verify_cache(path)[1] == []


def test_store_left_by_a_crashed_attempt_is_replaced(tmp_path):
    path = make_cache(tmp_path, [ITEMS0])

    def crash(stage):
        raise KeyboardInterrupt(stage)  # dies after placing its store, before the marker

    with pytest.raises(KeyboardInterrupt):
        write_shard(path, 0, ITEMS0, random_feats(ITEMS0, 1), before_seal=crash)
    assert (Path(path) / "shards" / "shard-000000.zarr").exists()
    assert not open_cache(path).shard_complete(0)
    fresh = random_feats(ITEMS0, 2)
    assert write_shard(path, 0, ITEMS0, fresh)[1] == "written"
    c = open_cache(path)
    np.testing.assert_array_equal(c.features("d"), fresh["d"].astype(np.float16))
    assert verify_cache(path)[1] == []
    assert not [p for p in (Path(path) / "shards").iterdir() if ".stale-" in p.name or ".tmp-" in p.name]


def test_racing_writers_leave_one_consistent_shard(tmp_path):
    """B runs its whole commit while A sits between placing its store and writing its marker."""
    path = make_cache(tmp_path, [ITEMS0])
    fa, fb = random_feats(ITEMS0, 1), random_feats(ITEMS0, 2)
    wb = ShardWriter(path, 0, entries_for(ITEMS0), dim=DIM, dtype="float16")
    for k, _, _ in ITEMS0:
        wb.add(k, fb[k])
    results = {}

    def b_finishes_now(stage):
        results["b"] = wb.commit()

    _, results["a"] = write_shard(path, 0, ITEMS0, fa, before_seal=b_finishes_now)
    assert results == {"b": "written", "a": "superseded"}
    c = open_cache(path)
    assert c.is_complete()
    for k in fb:
        np.testing.assert_array_equal(c.features(k, verify=True), fb[k].astype(np.float16))
    assert verify_cache(path)[1] == []


def test_superseded_writer_returns_once_the_winner_has_sealed(tmp_path):
    """B places its store over A's while A is between placing and sealing, and writes its marker only 0.5 s
    later: A's commit reports "superseded" and returns with the shard complete (holding B's features), so a job
    that checks its shards right after its tasks finds them complete."""
    path = make_cache(tmp_path, [ITEMS0])
    fa, fb = random_feats(ITEMS0, 1), random_feats(ITEMS0, 2)
    wb = ShardWriter(path, 0, entries_for(ITEMS0), dim=DIM, dtype="float16")
    for k, _, _ in ITEMS0:
        wb.add(k, fb[k])
    sealer = []

    def b_places_now_seals_later(stage):
        wb._flush(final=True)
        manifest = wb._write_manifest()
        files = ShardFiles(path, 0)
        assert wb._place_store(files)
        t = threading.Timer(0.5, wb._seal, args=(files, manifest))
        t.start()
        sealer.append(t)

    _, status = write_shard(path, 0, ITEMS0, fa, before_seal=b_places_now_seals_later)
    complete_on_return = open_cache(path).shard_complete(0)
    sealer[0].join()
    assert status == "superseded"
    assert complete_on_return
    c = open_cache(path)
    for k in fb:
        np.testing.assert_array_equal(c.features(k, verify=True), fb[k].astype(np.float16))


# ------------------------------------------------------------------------------------------ verify


@pytest.fixture
def two_shard_cache(tmp_path, small_chunks) -> str:
    path = make_cache(tmp_path, [ITEMS0, ITEMS1])
    write_shard(path, 0, ITEMS0, random_feats(ITEMS0, 0))
    write_shard(path, 1, ITEMS1, random_feats(ITEMS1, 1))
    assert verify_cache(path)[1] == []
    return path


def problems_of(path: str) -> list[str]:
    return [str(p) for p in verify_cache(path)[1]]


def test_verify_catches_a_flipped_byte(two_shard_cache):
    store = Path(two_shard_cache) / "shards" / "shard-000001.zarr"
    f = chunk_files(store)[0]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    f.write_bytes(bytes(raw))
    problems = problems_of(two_shard_cache)
    assert len(problems) == 1 and problems[0].startswith("shard-000001: ")
    assert "checksum" in problems[0] or "corrupt" in problems[0]
    # readers fail loudly, naming the shard, whichever key of the damaged chunk they touch
    c = open_cache(two_shard_cache)
    with pytest.raises(CacheError, match="shard-000001 key '(e|f)'"):
        for _ in c.iter_shard(1):
            pass
    errors = []
    for k in ("e", "f"):
        try:
            c.features(k)
        except CacheError as err:
            errors.append(str(err))
    assert errors and all("shard-000001 key '" in e and "spar cache verify --repair" in e for e in errors)
    np.testing.assert_array_equal(c.features("a"), random_feats(ITEMS0, 0)["a"].astype(np.float16))


def test_checksum_catches_damage_that_still_decodes(tmp_path):
    """Rewrite one image's rows through zarr itself (valid chunk, wrong values): only the manifest checksum
    can tell, and features() checks it by default."""
    path = make_cache(tmp_path, [ITEMS0])
    write_shard(path, 0, ITEMS0, random_feats(ITEMS0, 0))
    store = Path(path) / "shards" / "shard-000000.zarr"
    arr = zarr.open_array(zarr.storage.LocalStore(store), path="features", mode="r+")
    arr[36:40] = 0  # rows of key 'b' (offset 35, 36 rows)
    c = open_cache(path)
    with pytest.raises(CacheError, match="shard-000000 key 'b': features fail their checksum"):
        c.features("b")
    assert c.features("b", verify=False).shape == (9, 4, DIM)
    np.testing.assert_array_equal(c.features("a"), random_feats(ITEMS0, 0)["a"].astype(np.float16))
    assert [str(p) for p in verify_cache(path)[1]] == ["shard-000000: bad checksum for key 'b'"]


def test_verify_catches_truncated_store_missing_manifest_and_missing_marker(two_shard_cache):
    s0 = Path(two_shard_cache) / "shards" / "shard-000000.zarr"
    f = chunk_files(s0)[-1]
    f.write_bytes(f.read_bytes()[:10])
    (Path(two_shard_cache) / "shards" / "shard-000001.zarr" / "manifest.json").unlink()
    problems = problems_of(two_shard_cache)
    assert problems[0].startswith("shard-000000: store truncated or corrupt")
    assert problems[1] == "shard-000001: manifest missing"
    (Path(two_shard_cache) / "shards" / "shard-000001.done").unlink()
    assert problems_of(two_shard_cache)[1] == "shard-000001: incomplete (no completion marker)"
    shutil.rmtree(Path(two_shard_cache) / "shards" / "shard-000001.zarr")
    assert problems_of(two_shard_cache)[1] == "shard-000001: missing (never computed or not finished)"


def test_verify_catches_spec_not_matching_its_directory(two_shard_cache, tmp_path):
    moved = tmp_path / ("0" * 64)
    os.rename(two_shard_cache, moved)
    problems = problems_of(str(moved))
    assert problems == [
        f"spec.json: spec fingerprint {SPEC.fingerprint()} does not match its directory name {'0' * 64}"
    ]
    doc = json.loads((moved / "spec.json").read_text())
    doc["spec"]["stride"] = 16  # edited by hand: no longer hashes to its recorded fingerprint
    (moved / "spec.json").write_text(json.dumps(doc))
    assert any("records fingerprint" in p for p in problems_of(str(moved)))


def test_open_cache_refuses_a_non_cache(tmp_path):
    with pytest.raises(CacheError, match="not a teacher cache"):
        open_cache(str(tmp_path))
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        open_cache(str(tmp_path))


# ------------------------------------------------------------------------------------------ pairing


@pytest.fixture(scope="module")
def two_imagesets(tmp_path_factory, photo_dir, ray_local):
    """Two real image sets from the same photos with different augmentation seeds."""
    out = tmp_path_factory.mktemp("sets")
    sets = []
    for seed in (0, 1):
        cfg = IngestConfig(
            seed=seed, shard_size=3, target_long=160, target_short=112, min_short=64, max_side=160
        )
        ingest(str(photo_dir), str(out / f"set{seed}"), cfg, workers=2, progress=False)
        from pipeline.data.imageset import open_imageset

        sets.append(open_imageset(str(out / f"set{seed}")))
    assert sets[0].fingerprint != sets[1].fingerprint
    return sets


def cache_for(root: Path, ims) -> str:
    """A cache whose manifest describes ``ims`` (random features)."""
    spec = dataclasses.replace(SPEC, imageset_fingerprint=ims.fingerprint)
    path = str(root / spec.fingerprint())
    layout = {"num_shards": ims.num_shards, "num_images": len(ims.records), "dim": DIM, "patch_size": 16}
    write_spec(path, spec, layout, {"images": ims.url if hasattr(ims, "url") else None})
    rng = np.random.default_rng(0)
    for i in range(ims.num_shards):
        recs = ims.shard_records(i)
        entries = [
            ShardEntry(r.key, 0, r.height // 16, r.width // 16, r.height, r.width, r.pixel_sha256)
            for r in recs
        ]
        w = ShardWriter(path, i, entries, dim=DIM, dtype="float16")
        for e in entries:
            w.add(e.key, rng.standard_normal((e.h, e.w, DIM)))
        assert w.commit() == "written"
    return path


def test_pairing_with_another_image_set_is_refused(tmp_path, two_imagesets):
    a, b = two_imagesets
    c = open_cache(cache_for(tmp_path, a))
    c.check_pairing(a)
    with pytest.raises(CachePairingError, match="computed for image set"):
        c.check_pairing(b)

    # same fingerprint but one image's pixels differ (a tampered manifest): caught per image, naming the key
    recs = list(a.records)
    bad = recs[4]
    changed = dataclasses.replace(bad, pixel_sha256="0" * 64)
    fake = SimpleNamespace(
        fingerprint=a.fingerprint,
        num_shards=a.num_shards,
        shard_records=lambda i: [changed if r.key == bad.key else r for r in a.shard_records(i)],
    )
    with pytest.raises(CachePairingError, match=f"image '{bad.key}' has different pixels"):
        c.check_pairing(fake)
    resized = dataclasses.replace(bad, height=bad.height + 16)
    fake.shard_records = lambda i: [resized if r.key == bad.key else r for r in a.shard_records(i)]
    with pytest.raises(CachePairingError, match=f"image '{bad.key}' is"):
        c.check_pairing(fake)


def test_pairing_refuses_an_incomplete_cache(tmp_path, two_imagesets):
    a, _ = two_imagesets
    path = cache_for(tmp_path, a)
    (Path(path) / "shards" / "shard-000001.done").unlink()
    with pytest.raises(CachePairingError, match="shard-000001 is not complete"):
        open_cache(path).check_pairing(a)
    open_cache(path).check_pairing(a, require_complete=False)


# ------------------------------------------------------------------------------------------ ls / rm / gc CLI


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(list(argv))
    return resolve_handler(args)(args)


def test_ls_rm_gc(tmp_path, capsys):
    root = tmp_path / "caches"
    full = make_cache(root, [ITEMS0, ITEMS1])
    write_shard(full, 0, ITEMS0, random_feats(ITEMS0, 0))
    write_shard(full, 1, ITEMS1, random_feats(ITEMS1, 1))
    other = dataclasses.replace(SPEC, stride=32)
    half = make_cache(root, [ITEMS0, ITEMS1], spec=other)
    write_shard(half, 1, ITEMS1, random_feats(ITEMS1, 1))
    (root / "not-a-cache-dir").mkdir()
    assert sorted(list_caches(str(root))) == sorted([full, half])

    s = summarize(full)
    assert (s["shards_done"], s["shards_total"], s["images_done"]) == (2, 2, 6)
    on_disk = sum(p.stat().st_size for p in Path(full).rglob("*") if p.is_file())
    assert s["bytes"] == on_disk and s["bytes_per_image"] == on_disk / 6
    assert summarize(half)["shards_done"] == 1

    assert run_cli("cache", "ls", "--cache-root", str(root)) == 0
    out = capsys.readouterr().out
    assert "shards 2/2" in out and "shards 1/2" in out and SPEC.fingerprint()[:16] in out

    assert run_cli("cache", "verify", full) == 0
    assert run_cli("cache", "verify", half) == 1  # shard 0 missing
    assert "BAD shard-000000: missing" in capsys.readouterr().out

    with pytest.raises(CacheError, match="not a teacher cache"):
        run_cli("cache", "rm", str(root / "not-a-cache-dir"))
    assert run_cli("cache", "rm", half) == 0
    assert not Path(half).exists() and Path(full).exists()

    assert run_cli("cache", "gc", "--cache-root", str(root), "--older-than", "0") == 0
    assert Path(full).exists() and (root / "not-a-cache-dir").exists()  # not ours to delete: wrong name shape
