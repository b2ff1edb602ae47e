"""Precompute under real faults: a whole local Ray cluster killed mid-run, a full disk (size-limited tmpfs), a
write error (an immutable shards directory), and two precompute jobs racing on one cache.

A Ray task SIGKILLed mid-shard is already covered by tests/pipeline/test_precompute.py
(``test_sigkilled_task_then_rerun_gives_a_complete_verified_cache`` and
``test_worker_killed_after_placing_its_store_is_retried_by_ray``); it is not repeated here.

After every fault the same checks: the re-run finishes the cache, ``spar cache verify`` passes, no key is missing
or duplicated, shards finished before the fault are not recomputed, every feature equals a fault-free reference
cache, and at no point does a half-written shard read as complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from pipeline.cache.maintenance import verify_cache
from pipeline.cache.precompute import precompute
from pipeline.cache.reader import open_cache
from pipeline.cache.spec import CacheError
from tests.builders import make_imageset, precompute_argv, precompute_cfg
from tests.reliability.conftest import (
    assert_cache_equals_reference,
    assert_user_error,
    complete_shards,
    kill_session,
    run_main,
    shard_attempts,
    start_spar,
)

# a slower teacher configuration (stride 16, one window per forward) so that a run lasts long enough to be
# interrupted between shards: ~45 windows per image
SLOW = dict(stride=16, window_batch=1, workers=1)
SLOW_ARGS = ["--stride", "16", "--window-batch", "1", "--workers", "1"]


@pytest.fixture(autouse=True)
def _ray(ray_up):
    return ray_up


@pytest.fixture(scope="module")
def slow_set(tmp_path_factory, ray_local) -> dict[str, str]:
    """An image set of 4 shards x 2 images and its fault-free reference cache (stride 16)."""
    root = tmp_path_factory.mktemp("rel-slow")
    images = make_imageset(root, n=8, shard_size=2, seed=1)
    ref = precompute(precompute_cfg(images, root / "ref", **SLOW))
    return {"images": images, "reference": ref}


def _cache_dir(root: Path) -> Path | None:
    dirs = [d for d in root.iterdir() if d.is_dir()] if root.exists() else []
    return dirs[0] if dirs else None


def _no_half_written_shard_is_complete(path: str) -> None:
    """Every shard that reads as complete verifies; every other one is invisible to readers."""
    c = open_cache(path)
    problems = {p.where: p.problem for p in verify_cache(path)[1]}
    for i in range(c.num_shards):
        name = f"shard-{i:06d}"
        if c.shard_complete(i):
            assert name not in problems, problems[name]
        else:
            with pytest.raises(CacheError, match="not complete"):
                c.shard_keys(i)
            assert name in problems  # verify reports it (missing / incomplete)


# ------------------------------------------------------------------------------------------ whole cluster killed


def test_whole_local_cluster_killed_mid_run_then_rerun(slow_set, tmp_path, wait_until):
    """`spar precompute` (driver + its in-process local Ray cluster: ``runner=ray``) in its own session; once the
    first shard is complete, SIGKILL the driver's whole process tree and session. Then re-run."""
    root = tmp_path / "cache"
    log = tmp_path / "precompute.log"
    proc = start_spar(precompute_argv(slow_set["images"], root, *SLOW_ARGS, "--set", "runner=ray"), log)
    try:
        wait_until(lambda: (d := _cache_dir(root)) is not None and any((d / "shards").glob("*.done"))
                   or proc.poll() is not None, timeout=400, what="the first complete shard")  # fmt: skip
        assert proc.poll() is None, (
            f"precompute finished before it could be killed:\n{log.read_text()[-2000:]}"
        )
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(tree) > 2, "no Ray processes under the driver"
        for pid in tree:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        kill_session(proc.pid)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
    assert proc.returncode == -9
    assert not [
        p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]

    path = str(_cache_dir(root))
    done = complete_shards(path)
    assert 1 <= len(done) < 4, done
    _no_half_written_shard_is_complete(path)
    kept = shard_attempts(path)

    assert precompute(precompute_cfg(slow_set["images"], root, **SLOW)) == path
    now = shard_attempts(path)
    assert {k: now[k] for k in kept} == kept  # finished shards were not recomputed
    assert_cache_equals_reference(path, slow_set["reference"], slow_set["images"])
    # leftovers of the killed attempt are garbage, never data; gc removes them
    from pipeline.cache.maintenance import gc_caches

    gc_caches(str(root), older_than_s=0)
    assert sorted(p.name for p in (Path(path) / "shards").iterdir()) == sorted(
        [f"shard-{i:06d}.done" for i in range(4)] + [f"shard-{i:06d}.zarr" for i in range(4)]
    )


# ------------------------------------------------------------------------------------------ concurrency


def test_two_precompute_jobs_on_one_cache_at_once(slow_set, tmp_path, wait_until):
    """A `spar precompute` process (one worker: its shards in its own process, no Ray) and a precompute on this
    session's Ray cluster (two tasks) fill the same cache at the same time: both succeed, the cache verifies and
    equals the reference."""
    root = tmp_path / "cache"
    log = tmp_path / "other.log"
    proc = start_spar(precompute_argv(slow_set["images"], root, *SLOW_ARGS), log)
    try:
        # start ours as soon as the other job is writing its first shard
        wait_until(lambda: (d := _cache_dir(root)) is not None and any((d / "shards").glob("*.tmp-*"))
                   or proc.poll() is not None, timeout=400, what="the other job's first shard")  # fmt: skip
        assert proc.poll() is None, log.read_text()[-2000:]
        assert psutil.Process(proc.pid).children(recursive=True) == []  # no Ray under it
        assert (
            len(complete_shards(str(_cache_dir(root)))) < 4
        )  # the other job is still mid-way: a real overlap
        path = precompute(precompute_cfg(slow_set["images"], root, **{**SLOW, "workers": 2}))
        other_rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            kill_session(proc.pid)
    assert other_rc == 0, log.read_text()[-3000:]
    assert log.read_text().strip().splitlines()[-1] == path
    assert_cache_equals_reference(path, slow_set["reference"], slow_set["images"])
    assert not [p.name for p in (Path(path) / "shards").iterdir() if ".tmp-" in p.name or ".stale-" in p.name]


# ------------------------------------------------------------------------------------------ full disk, write errors


@pytest.fixture
def small_tmpfs(tmp_path):
    """A size-limited tmpfs at tmp_path/disk (root only); yields (path, remount(size_bytes))."""
    mnt = tmp_path / "disk"
    mnt.mkdir()

    def mount(size: int, remount: bool = False) -> None:
        opts = f"size={size}" + (",remount" if remount else "")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True
        )
        if r.returncode:
            if remount:
                raise AssertionError(r.stderr)
            pytest.skip(f"cannot mount a size-limited tmpfs here ({r.stderr.strip()}); the immutable-directory "
                        "write-error test covers failed writes")  # fmt: skip

    mount(4096 * 64)
    try:
        yield mnt, mount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _pages(path: Path) -> int:
    return sum(-(-p.stat().st_size // 4096) for p in path.rglob("*") if p.is_file())


def test_full_disk_then_rerun_after_space_is_freed(rel_imageset, rel_reference_cache, small_tmpfs, capsys):
    """The cache root is a tmpfs with room for the spec and about two and a half shards: the run fails naming
    the shards that hit ENOSPC, keeps the complete ones; after the disk grows, the re-run finishes the cache."""
    mnt, mount = small_tmpfs
    ref = Path(rel_reference_cache)
    spec_pages = _pages(ref) - _pages(ref / "shards")
    shard_pages = [_pages(ref / "shards" / f"shard-{i:06d}.zarr") + 1 for i in range(4)]
    assert len(set(shard_pages)) == 1, shard_pages  # equal-size shards (same image sizes): deterministic cut
    room = spec_pages + 2 * shard_pages[0] + shard_pages[0] // 2
    mount(4096 * room, remount=True)
    argv = ["precompute", "--images", rel_imageset, "--teacher", "tiny-clip-64", "--crop", "64", "--stride", "32",
            "--cache-root", str(mnt), "--workers", "1", "--set", "autocast=none", "--set", "max_retries=0",
            "--set", "progress=false"]  # fmt: skip
    r = run_main(argv, capsys)
    assert_user_error(r, "incomplete", "shard-000002", "No space left on device")
    path = str(mnt / ref.name)
    assert complete_shards(path) == [0, 1]
    _no_half_written_shard_is_complete(path)
    kept = shard_attempts(path)

    mount(4096 * (spec_pages + 8 * shard_pages[0]), remount=True)  # space freed
    r = run_main(argv, capsys)
    assert r.rc == 0 and r.out.strip().splitlines()[-1] == path, r.err
    assert {k: shard_attempts(path)[k] for k in kept} == kept
    assert_cache_equals_reference(path, rel_reference_cache, rel_imageset)
    r = run_main(["cache", "verify", path], capsys)
    assert r.rc == 0 and r.out.startswith("ok:"), r.out + r.err


def test_write_error_on_the_shards_directory_then_rerun(rel_imageset, rel_reference_cache, tmp_path, capsys):
    """Shards 0 and 1 are done; then the shards directory refuses every write (immutable, even for root). The run
    fails naming the shards it could not write and keeps the others; the re-run after the fix completes."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr not available")
    cfg = precompute_cfg(rel_imageset, tmp_path)
    path = precompute(cfg, only_shards=[0, 1])
    assert complete_shards(path) == [0, 1]
    kept = shard_attempts(path)
    shards = Path(path) / "shards"
    r = subprocess.run(["chattr", "+i", str(shards)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"chattr +i not supported here: {r.stderr.strip()}")
    try:
        argv = precompute_argv(rel_imageset, tmp_path)
        res = run_main(argv, capsys)
        assert_user_error(
            res, "2 shard(s) incomplete", "shard-000002", "shard-000003", "Operation not permitted"
        )
        _no_half_written_shard_is_complete(path)
        assert shard_attempts(path) == kept
    finally:
        subprocess.run(["chattr", "-i", str(shards)], check=True)
    res = run_main(argv, capsys)
    assert res.rc == 0, res.err
    assert {k: shard_attempts(path)[k] for k in kept} == kept
    assert_cache_equals_reference(path, rel_reference_cache, rel_imageset)


def test_full_disk_before_the_spec_is_written_is_one_clear_line(rel_imageset, small_tmpfs, capsys):
    mnt, mount = small_tmpfs
    mount(4096, remount=True)  # one page, filled below
    (mnt / "fill").write_bytes(b"\0" * 4096)
    r = run_main(precompute_argv(rel_imageset, mnt), capsys)
    assert_user_error(r, str(mnt), "No space left on device")
    assert [p.name for p in mnt.rglob("*") if p.is_file()] == ["fill"]
