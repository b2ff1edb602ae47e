"""Shared pieces of the reliability suite: tiny synthetic image sets, a reference teacher cache, and helpers that
run the real ``spar`` command (in-process through ``pipeline.cli.main`` and as a separate process).

Everything is small on purpose (the machine has 2 shared cores): images of 64..192 px, the ``tiny-clip-64``
backbone, crop 64 / stride 32.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.builders import CROP, STRIDE, TEACHER, make_imageset, precompute_cfg  # noqa: F401 - used by fixtures

REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 300  # seconds for one `spar` process on a loaded 2-core machine


@pytest.fixture(scope="session")
def rel_imageset(tmp_path_factory, ray_local) -> str:
    """8 synthetic images (96x128 sources), 4 shards of 2."""
    return make_imageset(tmp_path_factory.mktemp("rel-imageset"), n=8, shard_size=2)


@pytest.fixture(scope="session")
def rel_reference_cache(tmp_path_factory, rel_imageset, ray_local) -> str:
    """The tiny teacher's cache of ``rel_imageset``, computed once without any fault (the reference)."""
    from pipeline.cache.precompute import precompute

    return precompute(precompute_cfg(rel_imageset, tmp_path_factory.mktemp("rel-ref-cache")))


# ------------------------------------------------------------------------------------------ cache checks


def cache_features(path: str) -> dict[str, np.ndarray]:
    """Every key's features (verified against their checksums), float32."""
    from pipeline.cache.reader import open_cache

    c = open_cache(path)
    return {k: np.asarray(c.features(k, verify=True), dtype=np.float32) for k in c.keys()}


def assert_cache_equals_reference(path: str, reference: str, images: str) -> None:
    """Complete, verifies, one entry per image-set key (no key missing or duplicated), features equal the
    fault-free reference cache (same teacher, same pixels)."""
    from pipeline.cache.maintenance import verify_cache
    from pipeline.cache.reader import open_cache
    from pipeline.data.imageset import open_imageset

    c = open_cache(path)
    assert c.is_complete(), c.incomplete_shards()
    assert verify_cache(path)[1] == []
    keys = [k for i in range(c.num_shards) for k in c.shard_keys(i)]
    want = [r.key for r in open_imageset(images).records]
    assert len(keys) == len(set(keys)), "duplicated keys"
    assert sorted(keys) == sorted(want), "missing or extra keys"
    got, ref = cache_features(path), cache_features(reference)
    for k in want:
        np.testing.assert_allclose(
            got[k], ref[k], rtol=2e-3, atol=2e-3 * float(np.abs(ref[k]).max()), err_msg=k
        )


def shard_attempts(path: str) -> dict[str, str]:
    """Completion-marker attempt id per complete shard name."""
    return {
        p.name: json.loads(p.read_text())["attempt"] for p in sorted((Path(path) / "shards").glob("*.done"))
    }


def complete_shards(path: str) -> list[int]:
    from pipeline.cache.reader import open_cache

    c = open_cache(path)
    return [i for i in range(c.num_shards) if c.shard_complete(i)]


# ------------------------------------------------------------------------------------------ the real CLI


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@dataclass
class CliResult:
    rc: int
    out: str
    err: str


def spar_process(
    argv: list[str], timeout: float = CLI_TIMEOUT, cwd: Path | None = None, **env: str
) -> CliResult:
    """Run ``python -m pipeline.cli ARGV`` as its own process (its own session, killed whole on timeout)."""
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], cwd=str(cwd or REPO), env=cli_env(**env),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(p.pid)
        out, err = p.communicate()
        raise AssertionError(f"spar {' '.join(argv)} timed out after {timeout}s\n{err[-3000:]}") from None
    return CliResult(p.returncode, out, err)


def start_spar(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    """Start ``python -m pipeline.cli ARGV`` in the background, in its own session, output to ``log``."""
    f = open(log, "w")  # noqa: SIM115 - closed when the process is reaped by the caller
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], cwd=str(REPO), env=cli_env(**env),
                            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def session_pids(sid: int) -> list[int]:
    """PIDs of live processes in session ``sid`` (a CLI process started with start_new_session and its Ray)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def kill_session(sid: int, wait: float = 30.0) -> None:
    """SIGKILL every process of session ``sid`` (process group first, then stragglers by PID), wait until gone."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        left = session_pids(sid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def assert_user_error(r: CliResult, *needles: str) -> None:
    """Exit code 2, no traceback, the message on one stderr line naming every needle."""
    assert r.rc == 2, (r.rc, r.err[-3000:])
    assert "Traceback" not in r.err, r.err[-3000:]
    lines = [ln for ln in r.err.splitlines() if ln.startswith("spar ") and ": error: " in ln]
    assert len(lines) == 1, r.err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def run_main(argv: list[str], capsys) -> CliResult:
    """The real CLI entry point in-process: ``pipeline.cli.main(argv)`` (argparse errors exit 2 too)."""
    from pipeline.cli import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    cap = capsys.readouterr()
    return CliResult(rc, cap.out, cap.err)


@pytest.fixture
def wait_until():
    def _wait(cond, timeout: float, what: str, every: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    return _wait


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())
