"""Precompute: real image sets (ingest of scikit-image photos), real Ray tasks, real Zarr stores, real S3 (moto).

The reference for every cached feature is ``sliding_window_features`` run directly in the test on the image read
back from the image set.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cache.cli import add_cli
from pipeline.cache.config import PrecomputeConfig, precomputes_in_process
from pipeline.cache.maintenance import verify_cache
from pipeline.cache.precompute import precompute, repair_cache, resolve_spec
from pipeline.cache.reader import open_cache
from pipeline.cache.shard_task import compute_shard
from pipeline.cache.spec import CacheError, ShardEntry, cache_path_for
from pipeline.cache.writer import ShardWriter, write_spec
from pipeline.cli import resolve_handler
from pipeline.common import tracking
from pipeline.data.config import IngestConfig
from pipeline.data.imageset import ImageSetError, open_imageset
from pipeline.data.ingest import ingest
from spar_core.backbones import build_backbone
from spar_core.sliding import sliding_window_features
from tests.builders import S3_SECRET
from tests.reliability.faults import crash_once_in_workers

INGEST = dict(shard_size=2, target_long=160, target_short=112, min_short=64, max_side=160)


@pytest.fixture(autouse=True)
def _ray(ray_up):
    return ray_up


@pytest.fixture(scope="module")
def imageset(tmp_path_factory, photo_dir, ray_local) -> str:
    """A real image set: 6 photos, 3 shards of 2, sides 64..160 px."""
    out = tmp_path_factory.mktemp("imageset") / "set"
    ingest(str(photo_dir), str(out), IngestConfig(**INGEST), workers=2, progress=False)
    return str(out)


def cfg_for(images: str, cache_root: Path | str, **kw) -> PrecomputeConfig:
    base = dict(
        images=images,
        teacher="tiny-clip-64",
        crop=64,
        stride=24,
        cache_root=str(cache_root),
        autocast="none",
        workers=2,
        window_batch=8,
        progress=True,
        max_retries=1,
    )
    return PrecomputeConfig(**{**base, **kw})


def reference(images: str, key: str, crop: int, stride: int, amp=None) -> np.ndarray:
    bb = build_backbone("tiny-clip-64")
    img = np.array(open_imageset(images).read(key))  # (H, W, 3) uint8
    x = bb.normalize(torch.from_numpy(img)[None])
    return sliding_window_features(bb, x, crop, stride, window_batch=5, autocast_dtype=amp)[0].numpy()


def assert_matches_reference(path: str, images: str, crop: int, stride: int, amp=None, tol=2e-3) -> None:
    c = open_cache(path)
    ims = open_imageset(images)
    assert sorted(c.keys()) == sorted(r.key for r in ims.records)
    for r in ims.records:
        got = c.features(r.key, verify=True)
        assert got.shape == (r.height // 16, r.width // 16, c.dim) and got.dtype == np.float16
        ref = reference(images, r.key, crop, stride, amp)
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=tol, atol=tol * scale, err_msg=r.key)


def shard_attempts(path: str) -> dict[str, str]:
    return {
        p.name: json.loads(p.read_text())["attempt"] for p in sorted((Path(path) / "shards").glob("*.done"))
    }


# ------------------------------------------------------------------------------------------ correctness


def test_cached_features_equal_the_direct_teacher_and_rerun_is_a_noop(imageset, tmp_path, capfd):
    cfg = cfg_for(imageset, tmp_path)
    path = precompute(cfg)
    assert Path(path).name == open_cache(path).spec.fingerprint()
    assert_matches_reference(path, imageset, 64, 24)
    c = open_cache(path)
    c.check_pairing(open_imageset(imageset))
    assert verify_cache(path)[1] == []
    assert c.spec.weights_id == build_backbone("tiny-clip-64").weights_id
    assert [k for k, _ in c.iter_shard(1)] == [r.key for r in open_imageset(imageset).shard_records(1)]
    before = shard_attempts(path)
    capfd.readouterr()

    assert precompute(cfg) == path
    assert "cache complete, nothing to compute" in capfd.readouterr().err
    assert shard_attempts(path) == before  # nothing rewritten


def test_task_stats_report_windows_device_and_one_teacher_build_per_worker(imageset, tmp_path):
    def windows_1d(length: int, crop: int = 64, stride: int = 24) -> int:
        if length <= crop:
            return 1
        return (length - crop) // stride + 1 + (1 if (length - crop) % stride else 0)

    stats: list[dict] = []
    path = precompute(cfg_for(imageset, tmp_path, workers=1, runner="ray"), stats=stats)
    ims = open_imageset(imageset)
    assert sorted(s["shard"] for s in stats) == list(range(ims.num_shards))
    assert {s["status"] for s in stats} == {"written"}
    assert {s["device"] for s in stats} == {"cpu"}
    want = {
        i: sum(windows_1d(r.height) * windows_1d(r.width) for r in ims.shard_records(i))
        for i in range(ims.num_shards)
    }
    assert {s["shard"]: s["windows"] for s in stats} == want
    # the teacher is built at most once per worker process, however many shards that process computes: the
    # process's build count (which counts earlier tests' teachers too, in a warm worker) never grows within the run
    for pid in {s["pid"] for s in stats}:
        assert len({s["teacher_builds"] for s in stats if s["pid"] == pid}) == 1
    more: list[dict] = []
    assert precompute(cfg_for(imageset, tmp_path, workers=1, runner="ray"), stats=more) == path
    assert more == []  # a complete cache runs no task


def test_auto_precomputes_in_process_only_for_one_worker_without_a_cluster_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert precomputes_in_process(PrecomputeConfig(workers=1))
    assert not precomputes_in_process(PrecomputeConfig())  # 0 = as many tasks as the cluster schedules
    assert not precomputes_in_process(PrecomputeConfig(workers=2))
    assert not precomputes_in_process(PrecomputeConfig(workers=1, ray_address="ray://head:10001"))
    assert not precomputes_in_process(PrecomputeConfig(workers=1, runner="ray"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a job on a cluster
    assert not precomputes_in_process(PrecomputeConfig(workers=1))
    assert precomputes_in_process(PrecomputeConfig(workers=3, runner="in-process"))


def test_in_process_precompute_equals_the_teacher_retries_a_failing_shard_and_keeps_the_others(
    imageset, tmp_path, monkeypatch
):
    """workers = 1 on this machine: every shard in this process (its pid), one teacher build, torch's thread count
    restored; a shard that raises once is computed again (max_retries); one that keeps raising fails the run with
    its name, the others are kept, and the re-run computes only that one."""
    import os

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    threads = torch.get_num_threads()
    ims = open_imageset(imageset)
    calls: list[int] = []  # the teacher's calls, one per image
    failing = {"at": 2, "times": 1}  # the 2nd image (shard 0's second) raises once

    def flaky_teacher(*a, **kw):
        calls.append(1)
        if len(calls) == failing["at"] and failing["times"] > 0:
            failing["times"] -= 1
            raise RuntimeError("teacher hiccup")
        return sliding_window_features(*a, **kw)

    monkeypatch.setattr("pipeline.cache.shard_task.sliding_window_features", flaky_teacher)
    stats: list[dict] = []
    path = precompute(cfg_for(imageset, tmp_path / "a", workers=1, cpus_per_task=2), stats=stats)
    assert sorted(s["shard"] for s in stats) == list(range(ims.num_shards))
    assert {s["pid"] for s in stats} == {os.getpid()}  # no Ray task: this process
    assert len({s["teacher_builds"] for s in stats}) == 1  # built once for every shard
    assert (
        len(calls) == len(ims.records) + 2
    )  # shard 0 again from its start: its first image twice, one failed call
    assert torch.get_num_threads() == threads
    assert_matches_reference(path, imageset, 64, 24)
    assert verify_cache(path)[1] == []

    from pipeline.cache import shard_task

    real, attempts = shard_task._write_shard, []

    def shard_1_keeps_failing(cache, images, shard, *a):
        if shard == 1:
            attempts.append(shard)
            raise RuntimeError("cannot compute shard 1")
        return real(cache, images, shard, *a)

    monkeypatch.undo()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(shard_task, "_write_shard", shard_1_keeps_failing)
    with pytest.raises(CacheError, match=r"shard-000001: RuntimeError: cannot compute shard 1"):
        precompute(cfg_for(imageset, tmp_path / "b", workers=1))
    part = str(next((tmp_path / "b").iterdir()))
    assert attempts == [1, 1]  # max_retries = 1: two attempts
    assert open_cache(part).incomplete_shards() == [1]
    kept = shard_attempts(part)
    monkeypatch.setattr(shard_task, "_write_shard", real)
    assert precompute(cfg_for(imageset, tmp_path / "b", workers=1)) == part
    now = shard_attempts(part)
    assert {k: now[k] for k in kept} == kept and len(now) == ims.num_shards
    assert_matches_reference(part, imageset, 64, 24)


def test_bf16_autocast_default_is_close_to_float32(imageset, tmp_path):
    cfg = cfg_for(imageset, tmp_path, autocast="bf16", stride=32, workers=1)
    path = precompute(cfg)
    assert open_cache(path).spec.autocast == "bf16"
    # bf16 has 8 mantissa bits: compare with the float32 teacher at bf16 tolerance, and exactly-ish with bf16
    assert_matches_reference(path, imageset, 64, 32, amp=None, tol=3e-2)
    assert_matches_reference(path, imageset, 64, 32, amp=torch.bfloat16, tol=2e-3)


def test_precast_weights_give_bit_identical_autocast_features(photos):
    img = np.array(photos["coffee"][:160, :224])  # (160, 224, 3)
    ref_bb, cast_bb = (
        build_backbone("tiny-clip-64"),
        build_backbone("tiny-clip-64").precast_for_autocast(torch.bfloat16),
    )
    assert cast_bb.model.visual.conv1.weight.dtype == torch.bfloat16
    assert cast_bb.model.visual.ln_post.weight.dtype == torch.float32
    outs = []
    for bb in (ref_bb, cast_bb):
        x = bb.normalize(torch.from_numpy(img)[None]).float()
        outs.append(sliding_window_features(bb, x, 64, 24, window_batch=7, autocast_dtype=torch.bfloat16))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_fingerprint_follows_every_spec_input(imageset, photo_dir, tmp_path):
    ims = open_imageset(imageset)
    base = cfg_for(imageset, tmp_path)

    def fp(cfg, images=ims):
        return resolve_spec(cfg, images)[0].fingerprint()

    f0 = fp(base)
    variants = {
        "crop": dataclasses.replace(base, crop=48),
        "stride": dataclasses.replace(base, stride=32),
        "dtype": dataclasses.replace(base, dtype="float32"),
        "autocast": dataclasses.replace(base, autocast="bf16"),
        "weights": dataclasses.replace(base, seed=1),
        "teacher": dataclasses.replace(base, teacher="tiny-clip-224", crop=64),
    }
    fps = {name: fp(cfg) for name, cfg in variants.items()}
    assert len(set(fps.values()) | {f0}) == len(fps) + 1, fps
    assert fp(dataclasses.replace(base, window_batch=3, workers=1, cache_root="/elsewhere")) == f0

    # the same weights from two different files: same weights_id, same cache
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in build_backbone("tiny-clip-64", seed=5).model.state_dict().items()}
    for name in ("a.safetensors", "b.safetensors"):
        save_file(sd, str(tmp_path / name))
    fa = fp(dataclasses.replace(base, pretrained=str(tmp_path / "a.safetensors")))
    fb = fp(dataclasses.replace(base, pretrained=str(tmp_path / "b.safetensors")))
    assert fa == fb != f0

    # re-ingesting the same photos gives the same cache; changing a patch of one photo gives another (a patch,
    # not one pixel: the reference's resize has no antialiasing, so a downscale may skip a single changed pixel,
    # and identical ingested pixels rightly give the same cache)
    same = tmp_path / "same"
    ingest(str(photo_dir), str(same), IngestConfig(**INGEST), workers=2, progress=False)
    assert fp(base, open_imageset(str(same))) == f0
    src = tmp_path / "src"
    shutil.copytree(photo_dir, src)
    first = sorted(src.glob("*.png"))[0]
    arr = np.array(Image.open(first).convert("RGB"))
    cy, cx = arr.shape[0] // 2, arr.shape[1] // 2
    arr[cy - 8 : cy + 8, cx - 8 : cx + 8] ^= 0x40
    Image.fromarray(arr).save(first)
    ingest(str(src), str(tmp_path / "changed"), IngestConfig(**INGEST), workers=2, progress=False)
    assert fp(base, open_imageset(str(tmp_path / "changed"))) != f0


def test_bad_window_parameters_are_refused_before_any_task(imageset, tmp_path):
    with pytest.raises(CacheError, match="crop"):
        precompute(cfg_for(imageset, tmp_path, crop=40))
    with pytest.raises(CacheError, match=r"larger than the image"):
        precompute(cfg_for(imageset, tmp_path, crop=256))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ faults


def test_sigkilled_task_then_rerun_gives_a_complete_verified_cache(imageset, tmp_path):
    """A task SIGKILLs its own worker after computing part of its shard; no retries: the run fails, keeps the
    finished shards, and the re-run computes only what is missing."""
    marker = tmp_path / "killed-once"
    cfg = cfg_for(imageset, tmp_path / "cache", max_retries=0)
    with crash_once_in_workers(marker, "first-image"):
        with pytest.raises(CacheError, match="incomplete"):
            precompute(cfg)
        assert marker.exists()
        path = str(next((tmp_path / "cache").iterdir()))
        c = open_cache(path)
        missing = c.incomplete_shards()
        assert len(missing) == 1
        kept = shard_attempts(path)
        assert len(kept) == 2

        precompute(cfg)  # marker exists: no more crashes
    now = shard_attempts(path)
    assert {k: now[k] for k in kept} == kept  # finished shards were not recomputed
    assert len(now) == 3
    assert verify_cache(path)[1] == []
    c = open_cache(path)
    keys = [k for i in range(c.num_shards) for k in c.shard_keys(i)]
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(
        r.key for r in open_imageset(imageset).records
    )
    assert_matches_reference(path, imageset, 64, 24)


def test_worker_killed_after_placing_its_store_is_retried_by_ray(imageset, tmp_path):
    """Dies between placing the store and writing the marker; Ray's retry replaces the orphan store."""
    marker = tmp_path / "killed-once"
    with crash_once_in_workers(marker, "placed"):
        path = precompute(cfg_for(imageset, tmp_path / "cache", max_retries=2, stride=32))
    assert marker.exists()
    assert open_cache(path).is_complete() and verify_cache(path)[1] == []
    leftovers = [
        p.name for p in (Path(path) / "shards").iterdir() if ".tmp-" in p.name or ".stale-" in p.name
    ]
    assert leftovers == []
    assert_matches_reference(path, imageset, 64, 32)


def test_flipped_byte_is_caught_by_verify_and_fixed_by_repair(imageset, tmp_path, capsys):
    path = precompute(cfg_for(imageset, tmp_path, stride=32))
    good = {k: open_cache(path).features(k) for k in open_cache(path).keys()}
    chunk = sorted((Path(path) / "shards" / "shard-000002.zarr" / "features" / "c").rglob("*"))[-1]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    problems = verify_cache(path)[1]
    assert [p.where for p in problems] == ["shard-000002"]

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    add_cli(sub)
    args = parser.parse_args(["cache", "verify", path])
    assert resolve_handler(args)(args) == 1
    assert "BAD shard-000002" in capsys.readouterr().out
    args = parser.parse_args(["cache", "verify", path, "--repair"])
    assert resolve_handler(args)(args) == 0
    assert "repaired" in capsys.readouterr().out
    c = open_cache(path)
    for k, v in good.items():
        np.testing.assert_array_equal(c.features(k), v)


def test_repair_refuses_when_the_recorded_teacher_no_longer_matches(imageset, tmp_path):
    path = precompute(cfg_for(imageset, tmp_path, stride=32, workers=1))
    doc = json.loads((Path(path) / "spec.json").read_text())
    doc["hints"]["seed"] = 7  # the hint now rebuilds other weights
    (Path(path) / "spec.json").write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="cannot repair"):
        repair_cache(path, [0])
    assert open_cache(path).is_complete()  # nothing invalidated


# ------------------------------------------------------------------------------------------ S3 and CLI


@pytest.fixture
def s3_server():
    from tests.builders import moto_s3

    with moto_s3("spar-caches") as (fs, _env):
        yield fs


def test_s3_round_trip(imageset, tmp_path, s3_server, monkeypatch):
    import pipeline.cache.precompute as pc

    sent: list[str] = []  # every task's arguments and options, as the driver hands them to Ray
    make_task = pc._shard_task

    def recording_task(cfg):
        task, cpus = make_task(cfg)

        class Recorder:
            def remote(self, *args):
                sent.append(repr(args))
                return task.remote(*args)

        sent.append(repr(task._default_options))
        return Recorder(), cpus

    monkeypatch.setattr(pc, "_shard_task", recording_task)
    local = precompute(cfg_for(imageset, tmp_path, stride=32))
    remote = precompute(cfg_for(imageset, "s3://spar-caches/teacher", stride=32))
    # the Ray workers (started before this test set the variables) reached S3 with the credentials of the runtime
    # environment; the secret was in the tasks' runtime_env, never in their arguments
    args, options = [x for x in sent if "runtime_env" not in x], [x for x in sent if "runtime_env" in x]
    assert args and not any(S3_SECRET in a for a in args)
    assert any(S3_SECRET in o for o in options)
    assert remote == f"s3://spar-caches/teacher/{Path(local).name}"  # same spec, same fingerprint anywhere
    files = s3_server.find("spar-caches/teacher")
    assert any(f.endswith("shards/shard-000002.done") for f in files)
    assert any("/features/c/" in f for f in files)
    c_remote, c_local = open_cache(remote), open_cache(local)
    assert c_remote.is_complete()
    c_remote.check_pairing(open_imageset(imageset))
    for k in c_local.keys():
        np.testing.assert_allclose(
            c_remote.features(k, verify=True).astype(np.float32),
            c_local.features(k).astype(np.float32),
            atol=2e-3,
        )
    assert verify_cache(remote)[1] == []
    assert precompute(cfg_for(imageset, "s3://spar-caches/teacher", stride=32)) == remote  # no-op on S3 too


def test_cli_precompute_with_recipe_and_flags(imageset, tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[precompute]\nteacher = "tiny-clip-64"\nstride = 48\nautocast = "none"\nworkers = 2\n')
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="cmd"))
    argv = [
        "precompute",
        "--images",
        imageset,
        "--crop",
        "64",
        "--stride",
        "32",
        "--cache-root",
        str(tmp_path / "c"),
    ]
    args = parser.parse_args([*argv, "--config", str(recipe), "--set", "window_batch=4"])
    assert resolve_handler(args)(args) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    spec = open_cache(path).spec
    assert (spec.crop, spec.stride, spec.autocast, spec.backbone) == (64, 32, "none", "tiny-clip-64")
    assert_matches_reference(path, imageset, 64, 32)


def test_missing_images_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="required|image set|not"):
        precompute(cfg_for("", tmp_path))
    with pytest.raises(Exception, match=str(tmp_path / "nope")):
        precompute(cfg_for(str(tmp_path / "nope"), tmp_path))


def test_int8_cache_matches_the_teacher_within_its_step_and_is_verified_and_repaired(imageset, tmp_path):
    path = precompute(cfg_for(imageset, tmp_path, stride=32, dtype="int8"))
    c = open_cache(path)
    assert c.spec.dtype == "int8"
    for r in open_imageset(imageset).records:
        got = c.features(r.key)  # dequantised float32
        ref = reference(imageset, r.key, 64, 32)
        assert got.dtype == np.float32 and got.shape == ref.shape
        step = np.abs(ref).max(axis=-1, keepdims=True) / 127  # (h, w, 1): one int8 step per token
        assert (np.abs(got - ref) <= 0.5 * step + 1e-4 * np.abs(ref).max()).all(), r.key
    good = {k: c.features(k) for k in c.keys()}
    scales = Path(path) / "shards" / "shard-000001.zarr" / "scales" / "c"
    chunk = sorted(p for p in scales.rglob("*") if p.is_file())[-1]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    assert [p.where for p in verify_cache(path)[1]] == ["shard-000001"]
    repair_cache(path, [1])
    assert verify_cache(path)[1] == []
    c = open_cache(path)
    for k, v in good.items():
        np.testing.assert_array_equal(c.features(k), v)


# ------------------------------------------------------------------------------------------ the task body in-process
# compute_shard called directly (no Ray): decode, teacher and write overlap in three threads inside it.


@pytest.fixture
def one_thread():
    """compute_shard sets torch's threads to cpus_per_task (1); run the reference at the same count, restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def spec_only_cache(images: str, root: Path, **kw) -> tuple[str, PrecomputeConfig]:
    """A cache with its spec.json written and no shard computed yet."""
    cfg = cfg_for(images, root, **kw)
    spec, layout = resolve_spec(cfg, open_imageset(images))
    path = cache_path_for(str(root), spec.fingerprint())
    write_spec(path, spec, layout, {"images": images})
    return path, cfg


def sequential_shard(cache_path: str, images: str, shard: int, window_batch: int) -> None:
    """The reference: one plain loop, image by image: decode, teacher, ShardWriter.add; then commit."""
    c, ims = open_cache(cache_path), open_imageset(images)
    bb = build_backbone(c.spec.backbone)
    entries = [
        ShardEntry(r.key, 0, r.height // 16, r.width // 16, r.height, r.width, r.pixel_sha256)
        for r in ims.shard_records(shard)
    ]
    writer = ShardWriter(cache_path, shard, entries, dim=bb.dim, dtype=c.spec.dtype)
    for rec, img in ims.iter_shard(shard):
        x = bb.normalize(torch.from_numpy(np.array(img))[None]).float()
        feats = sliding_window_features(bb, x, c.spec.crop, c.spec.stride, window_batch)
        writer.add(rec.key, feats[0].numpy())
    assert writer.commit() == "written"


def chunk_bytes(store: Path) -> dict[str, bytes]:
    """Every stored chunk file of a Zarr store (``<array>/c/...``), by its path inside the store."""
    files = [p for p in store.rglob("*") if p.is_file() and "c" in p.relative_to(store).parts]
    return {str(p.relative_to(store)): p.read_bytes() for p in files}


def task_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("precompute-")]


def test_pipelined_task_writes_the_same_bytes_as_a_sequential_loop_and_times_its_stages(
    imageset, tmp_path, one_thread
):
    path, cfg = spec_only_cache(imageset, tmp_path / "piped", window_batch=3)
    ref = tmp_path / "seq" / Path(path).name
    ref.mkdir(parents=True)
    shutil.copy(Path(path) / "spec.json", ref / "spec.json")
    n = open_imageset(imageset).num_shards
    stats = [compute_shard(path, imageset, i, dataclasses.asdict(cfg)) for i in range(n)]
    for i in range(n):
        sequential_shard(str(ref), imageset, i, window_batch=3)
    assert task_threads() == []

    got, want = open_cache(path), open_cache(str(ref))
    assert got.is_complete() and want.is_complete() and verify_cache(path)[1] == []
    for i in range(n):
        assert got.shard_keys(i) == want.shard_keys(i)
        for k in got.shard_keys(i):
            np.testing.assert_array_equal(got.features(k), want.features(k), err_msg=k)
        stem = f"shards/shard-{i:06d}.zarr"
        chunks, ref_chunks = chunk_bytes(Path(path) / stem), chunk_bytes(ref / stem)
        assert chunks and chunks == ref_chunks  # the stored (compressed) chunks, byte for byte
        entries = [
            json.loads((root / stem / "manifest.json").read_text())["entries"] for root in (Path(path), ref)
        ]
        assert entries[0] == entries[1]  # keys, offsets, sizes, pixel hashes and feature checksums

    for st in stats:
        assert st["status"] == "written"
        times = [st["compute_s"], st["decode_wait_s"], st["write_wait_s"]]
        assert st["compute_s"] > 0 and min(times) >= 0
        assert st["compute_s"] <= st["seconds"]
        assert sum(times) <= st["seconds"]  # disjoint intervals of the task's own thread


def tamper_second_image(images: Path, shard: int) -> str:
    """Replace the pixels of shard ``shard``'s second image inside its tar (a valid PNG, wrong content)."""
    key = open_imageset(str(images)).shard_records(shard)[1].key
    tar = images / "images" / f"shard-{shard:06d}.tar"
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar, "w") as tf:
        for m, data in members:
            if m.name == f"{key}.png":
                arr = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
                arr[0, 0] ^= 0xFF
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                data = buf.getvalue()
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    return key


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["decode", "teacher", "write"])
def test_a_failure_in_any_stage_fails_the_task_and_leaves_no_shard(imageset, tmp_path, monkeypatch, where):
    images = tmp_path / "set"
    shutil.copytree(imageset, images)
    if where == "decode":
        key = tamper_second_image(images, 1)
        error, match = ImageSetError, key
    elif where == "teacher":
        calls = []

        def broken_teacher(*a, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("teacher ran out of memory")
            return sliding_window_features(*a, **kw)

        monkeypatch.setattr("pipeline.cache.shard_task.sliding_window_features", broken_teacher)
        error, match = RuntimeError, "teacher ran out of memory"
    else:
        add = ShardWriter.add

        def broken_add(self, key, feats):
            if self._next == 1:
                raise OSError("disk full while writing")
            add(self, key, feats)

        monkeypatch.setattr(ShardWriter, "add", broken_add)
        error, match = OSError, "disk full while writing"
    path, cfg = spec_only_cache(str(images), tmp_path / "cache")
    with pytest.raises(error, match=match):
        compute_shard(path, str(images), 1, dataclasses.asdict(cfg))
    assert task_threads() == []  # both helper threads stopped
    assert not open_cache(path).shard_complete(1)
    assert sorted(p.name for p in (Path(path) / "shards").glob("shard-000001*")) == []  # attempt discarded
    monkeypatch.undo()
    again = compute_shard(path, str(images), 0, dataclasses.asdict(cfg))
    assert again["status"] == "written"  # nothing left stuck


def test_precompute_run_logs_teacher_seconds_per_shard(imageset, tmp_path):
    import mlflow

    wd = tmp_path / "wd"
    stats: list[dict] = []
    path = precompute(
        cfg_for(imageset, tmp_path / "c", stride=32, workdir=str(wd), progress=False), stats=stats
    )
    client = mlflow.MlflowClient(tracking.tracking_uri(wd))
    (run,) = client.search_runs([client.get_experiment_by_name("spar-precompute").experiment_id])
    n = open_cache(path).num_shards
    by_step = {}
    for name in ("shard_seconds", "shard_compute_s", "shard_decode_wait_s", "shard_write_wait_s"):
        hist = client.get_metric_history(run.info.run_id, name)
        assert sorted(h.step for h in hist) == list(range(n)), name
        by_step[name] = {h.step: h.value for h in hist}
    for st in stats:
        i = st["shard"]
        assert by_step["shard_compute_s"][i] == pytest.approx(st["compute_s"]) and st["compute_s"] > 0
        assert by_step["shard_compute_s"][i] <= by_step["shard_seconds"][i]
    assert run.data.metrics["teacher_seconds"] == pytest.approx(sum(st["compute_s"] for st in stats))
