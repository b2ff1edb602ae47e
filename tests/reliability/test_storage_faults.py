"""Object storage that fails some requests (docs/reliability.md), quick part: the fault proxy itself, the
project's storage operations at a 5 % error rate, and what a persistent error looks like.

Real parts: moto's S3 server on 127.0.0.1 with :class:`tests.faultproxy.FaultProxy` in front of it; the code under
test reaches S3 only through the proxy (``AWS_ENDPOINT_URL``), the references are read from moto directly or are
the bytes the test wrote. Every test is bounded: a request budget on the proxy and a timeout.

The stages end to end at 5 % (ingest, precompute, distill, eval on ``s3://``) are ``slow``:
tests/reliability/test_storage_faults_e2e.py.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.common import storage
from tests.builders import moto_endpoint, moto_s3
from tests.faultproxy import FaultProxy, Faults, fault_proxy

BUCKET = "spar-faults"
FIVE_PERCENT = Faults(rate=0.05, kinds=("503", "500", "reset"), seed=26)


@dataclass
class S3Faulty:
    """moto (``direct``: its own endpoint) behind ``proxy``; this process's S3 environment points at the proxy."""

    direct: str
    proxy: FaultProxy
    mp: pytest.MonkeyPatch

    def set_attempts(self, n: int) -> None:
        """Attempts per request from now on (filesystems made before keep theirs: the instance cache is cleared)."""
        import s3fs

        self.mp.setenv(storage.RETRY_ATTEMPTS_ENV, str(n))
        s3fs.S3FileSystem.clear_instance_cache()

    def direct_fs(self):
        """An s3fs filesystem on moto itself (the reference view, no faults)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.direct, skip_instance_cache=True)


@pytest.fixture
def s3_faulty() -> Iterator[S3Faulty]:
    """The tests' moto server with an empty ``BUCKET``, and this process's S3 endpoint pointed at a fault proxy in
    front of it."""
    import s3fs

    direct = moto_endpoint()
    with (
        moto_s3(BUCKET),
        fault_proxy(direct, max_requests=3000) as proxy,
        pytest.MonkeyPatch.context() as mp,
    ):
        mp.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        yield S3Faulty(direct, proxy, mp)
        s3fs.S3FileSystem.clear_instance_cache()


def _get(url: str, path: str = "/") -> int:
    """Status of one GET on a fresh connection; -1 for a reset or refused connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (ConnectionError, http.client.HTTPException, OSError):
        return -1
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------ the proxy


@pytest.mark.timeout(60)
def test_proxy_injects_seeded_faults_latency_outages_and_keeps_its_budget(s3_faulty: S3Faulty) -> None:
    proxy = s3_faulty.proxy
    # a mixed fault sequence, the same for the same seed (two runs of 120 requests)
    runs = []
    for _ in range(2):
        proxy.set_faults(Faults(rate=0.3, seed=7))
        runs.append([_get(proxy.url, f"/{BUCKET}") for _ in range(120)])
    assert runs[0] == runs[1]
    got = runs[0]
    assert {200, 503, 500, -1} == set(got), set(got)
    assert 0.15 < sum(s != 200 for s in got) / len(got) < 0.45
    # the first start_after requests are forwarded, then every one is faulted
    proxy.set_faults(Faults(rate=1.0, kinds=("503",), start_after=3))
    assert [_get(proxy.url, f"/{BUCKET}") for _ in range(5)] == [200, 200, 200, 503, 503]
    # latency on every forwarded request
    proxy.set_faults(Faults(latency_s=0.3))
    t0 = time.monotonic()
    assert _get(proxy.url, f"/{BUCKET}") == 200
    assert time.monotonic() - t0 >= 0.3
    # an outage: connections refused (the port is closed), then the same port answers again
    proxy.set_faults(Faults())
    reopened = proxy.outage(1.0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    reopened.join(10)
    assert _get(proxy.url, f"/{BUCKET}") == 200
    # the budget: past max_requests every connection is reset and the proxy says so
    proxy.max_requests = proxy.stats["requests"] + 2
    assert [_get(proxy.url, f"/{BUCKET}") for _ in range(3)] == [200, 200, -1]
    assert proxy.over_budget


# ------------------------------------------------------------------------------------- storage at 5 % errors


@pytest.mark.timeout(120)
def test_storage_operations_at_5_percent_errors_give_the_fault_free_result(
    s3_faulty: S3Faulty, tmp_path: Path
) -> None:
    """Writes, reads, listings, folder copies and renames through :mod:`pipeline.common.storage` while 5 % of the
    requests fail (503 / 500 / reset, seeded): every result equals what was written, read back from moto directly."""
    proxy = s3_faulty.proxy
    rng = np.random.default_rng(0)
    blobs = {f"obj-{i:02d}.bin": rng.bytes(int(rng.integers(1, 4000))) for i in range(24)}
    local = tmp_path / "dir"
    (local / "sub").mkdir(parents=True)
    for name, data in list(blobs.items())[:6]:
        (local / "sub" / name).write_bytes(data)
    base = f"s3://{BUCKET}/ops-{time.time_ns()}"
    proxy.set_faults(FIVE_PERCENT)
    t0 = time.monotonic()
    for name, data in blobs.items():
        storage.write_bytes_atomic(storage.join(base, "flat", name), data)
    assert {n: storage.read_bytes(storage.join(base, "flat", n)) for n in blobs} == blobs
    assert storage.listdir(storage.join(base, "flat")) == sorted(blobs)
    assert storage.exists(storage.join(base, "flat", "obj-00.bin"))
    assert (
        storage.read_bytes(storage.join(base, "flat", "missing")) is None
    )  # a 404 is not retried into an error
    storage.put_dir(str(local), storage.join(base, "tree"))
    assert storage.rename_dir(storage.join(base, "tree"), storage.join(base, "moved"))
    back = tmp_path / "back"
    storage.get_dir(storage.join(base, "moved"), str(back))
    assert storage.size_on_disk(storage.join(base, "flat")) == sum(map(len, blobs.values()))
    seconds = time.monotonic() - t0
    # the reference: moto's own view, and the local tree
    ref = s3_faulty.direct_fs()
    root = base.removeprefix("s3://")
    assert {p.rsplit("/", 1)[-1]: ref.cat_file(p) for p in ref.find(f"{root}/flat")} == blobs
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*.bin")) == sorted(
        f"sub/{n}" for n in list(blobs)[:6]
    )
    assert not ref.exists(f"{root}/tree")
    faults = {k: proxy.stats[k] for k in ("503", "500", "reset")}
    print(f"STORAGE-5PCT requests={proxy.stats['requests']} faults={faults} seconds={seconds:.1f}")
    assert all(v > 0 for v in faults.values()), faults  # each kind was really injected
    assert not proxy.over_budget


# ---------------------------------------------------------------------------------------- persistent errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["503", "500", "reset"])
def test_a_persistent_error_fails_with_one_line_naming_the_url_and_the_attempts(
    s3_faulty: S3Faulty, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli import main

    s3_faulty.set_attempts(3)
    s3_faulty.proxy.set_faults(Faults(rate=1.0, kinds=(kind,)))
    url = f"s3://{BUCKET}/caches/0123abcd"
    assert main(["cache", "verify", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("spar cache: error: object storage: "), err
    assert f"s3://{BUCKET}/caches/0123abcd" in err[0] and "failed after 3 attempts" in err[0], err
    assert s3_faulty.proxy.stats[kind] % 3 == 0  # each request tried exactly 3 times
    assert not s3_faulty.proxy.over_budget


@pytest.mark.timeout(120)
def test_a_student_upload_cut_off_by_a_persistent_error_is_never_read_as_complete(
    s3_faulty: S3Faulty, tmp_path: Path
) -> None:
    """The export fails at its last request (every request fails from there on); the uploaded-but-uncommitted student is
    refused as incomplete, and the same export once storage is back gives the local copy's weights."""
    import torch

    from pipeline.student.format import CheckpointError, StudentMeta, load_student
    from pipeline.train.export import export_student
    from pipeline.train.state import TrainState, checkpoint_dir_name, save_training_checkpoint
    from spar_core.backbones import build_backbone

    bb = build_backbone("tiny-clip-64", seed=0)
    bb.set_trainable(2)
    src = save_training_checkpoint(
        bb, tmp_path / checkpoint_dir_name(3), TrainState(step=3), StudentMeta(2, {"step": 3})
    )
    proxy = s3_faulty.proxy
    s3_faulty.set_attempts(2)
    before = proxy.stats["requests"]
    export_student(src, f"s3://{BUCKET}/students/probe")  # fault-free: how many requests an export takes
    n = proxy.stats["requests"] - before
    url = f"s3://{BUCKET}/students/cut-{time.time_ns()}"
    proxy.set_faults(
        Faults(rate=1.0, kinds=("503",), start_after=n - 1)
    )  # all but the last request (the commit)
    with pytest.raises(storage.StorageUnavailableError, match="failed after 2 attempts"):
        export_student(src, url)
    proxy.set_faults(Faults())
    assert s3_faulty.direct_fs().find(url.removeprefix("s3://")), "the upload had started"
    with pytest.raises(CheckpointError, match="incomplete"):
        load_student(url)
    export_student(src, url)
    want = load_student(str(src)).state_dict()
    got = load_student(url).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not proxy.over_budget


def test_every_s3_filesystem_of_the_process_follows_the_one_retry_policy(monkeypatch) -> None:
    """fsspec hands out the project's S3 filesystem (Zarr, webdataset and pyarrow get theirs from fsspec), with
    botocore's standard retry mode and the configured attempts, and s3fs's own retry loop reduced to one pass."""
    import fsspec

    from pipeline.common.s3 import RetryingS3FileSystem

    monkeypatch.setenv(storage.RETRY_ATTEMPTS_ENV, "5")
    fs, _ = fsspec.core.url_to_fs("s3://any-bucket/x", skip_instance_cache=True)
    assert isinstance(fs, RetryingS3FileSystem) and fs.retries == 1
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 5}
    monkeypatch.delenv(storage.RETRY_ATTEMPTS_ENV)
    assert storage.retry_attempts() == storage.RETRY_ATTEMPTS
    assert os.environ.get(storage.RETRY_ATTEMPTS_ENV) is None
