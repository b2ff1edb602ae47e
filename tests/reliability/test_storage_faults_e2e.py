"""Object storage failing 5 % of its requests under the whole pipeline (docs/reliability.md), end to end (slow).

``spar pipeline`` (ingest -> precompute -> distill -> eval, the demo recipe made small) runs twice with its whole
workdir on ``s3://`` (moto's S3 server on 127.0.0.1), each in its own process with its own local Ray cluster:

* the reference talks to moto directly;
* the faulty run talks to it through :class:`tests.faultproxy.FaultProxy`, which answers 5 % of the requests
  (seeded) with 503 SlowDown, 500 InternalError or a reset connection: every S3 request of the run goes through it
  (the driver's, the Ray tasks' and the Ray Train worker's, Zarr's, webdataset's, Ray Train's storage).

Checked against the reference, reading moto directly: the image sets hold the same images (pixel hashes); the
teacher caches are complete, ``verify`` clean and bit-identical array for array; the students' weights are equal; the
fidelity evaluation's metrics are equal. No human step: one command, exit code 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.builders import moto_s3
from tests.e2e.conftest import ROOT
from tests.faultproxy import Faults, fault_proxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

BUCKET = "spar-flaky"
RECIPE = str(ROOT / "jobs" / "configs" / "demo.toml")
SETS = ["ingest.target_long=128", "ingest.target_short=96", "ingest.shard_size=2", "distill.max_steps=12",
        "distill.checkpoint_every=4", "distill.register_model=", "eval.overlays=0"]  # fmt: skip
SPAR = [sys.executable, "-c", "from pipeline.cli import entry; entry()"]
SCRUB = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
DONE = re.compile(r"\[spar pipeline\] done: cache (\S+), student (\S+), MLflow run (\w+)")


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """The tests' moto S3 server with an empty ``BUCKET``; this process reads it directly (the reference view)."""
    with moto_s3(BUCKET) as (_fs, env):
        yield env["AWS_ENDPOINT_URL"]


def _pipeline(endpoint: str, name: str, tmp: Path) -> tuple[dict[str, str], str, float]:
    """``spar pipeline`` with workdir ``s3://BUCKET/<name>`` through ``endpoint``; (outputs, stderr, seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith("PYTEST_")}
    env.update({"AWS_ENDPOINT_URL": endpoint, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / f'{name}.db'}",
                "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "TQDM_DISABLE": "1"})  # fmt: skip
    cmd = [*SPAR, "pipeline", "--config", RECIPE, "--workdir", f"s3://{BUCKET}/{name}",
           *[a for s in SETS for a in ("--set", s)]]  # fmt: skip
    cwd = tmp / name
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=2000)
    seconds = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-5000:]
    m = DONE.search(res.stdout)
    assert m, res.stdout[-3000:]
    return {"cache": m.group(1), "student": m.group(2), "run_id": m.group(3),
            "db": f"sqlite:///{tmp / f'{name}.db'}"}, res.stderr, seconds  # fmt: skip


@pytest.fixture(scope="module")
def reference(moto: str, tmp_path_factory) -> tuple[dict[str, str], float]:
    out, _err, seconds = _pipeline(moto, "reference", tmp_path_factory.mktemp("flaky-ref"))
    return out, seconds


def test_the_pipeline_on_s3_at_5_percent_errors_gives_the_fault_free_result(
    moto: str, reference, tmp_path: Path
) -> None:
    ref, ref_s = reference
    with fault_proxy(moto, Faults(rate=0.05, seed=26), max_requests=200_000) as proxy:
        got, err, got_s = _pipeline(proxy.url, "faulty", tmp_path)
        stats = dict(proxy.stats)
    print(f"STORAGE-5PCT-PIPELINE requests={stats.get('requests')} 503={stats.get('503')} 500={stats.get('500')} "
          f"reset={stats.get('reset')} seconds={got_s:.0f} (fault-free {ref_s:.0f})")  # fmt: skip
    assert all(stats.get(k, 0) > 0 for k in ("503", "500", "reset")), stats
    assert not proxy.over_budget
    assert "Traceback" not in err
    _assert_same_images(ref, got)
    _assert_same_cache(ref["cache"], got["cache"])
    _assert_same_student(ref["student"], got["student"])
    _assert_same_eval(ref, got)


def _assert_same_images(ref: dict[str, str], got: dict[str, str]) -> None:
    from pipeline.data.imageset import open_imageset

    def images(cache: str, name: str) -> list[tuple[str, str]]:
        root = cache.split("/cache/")[0]  # the workdir: <workdir>/images/{train,heldout}
        ims = open_imageset(f"{root}/images/{name}")
        return sorted((r.key, r.pixel_sha256) for r in ims.records)

    for name in ("train", "heldout"):
        assert images(got["cache"], name) == images(ref["cache"], name) != []


def _assert_same_cache(ref: str, got: str) -> None:
    from pipeline.cache.maintenance import verify_cache
    from pipeline.cache.reader import open_cache

    assert ref.rsplit("/", 1)[-1] == got.rsplit("/", 1)[-1]  # same teacher, same images: same fingerprint
    a, b = open_cache(ref), open_cache(got)
    assert b.is_complete() and verify_cache(got)[1] == []
    keys = [k for i in range(a.num_shards) for k in a.shard_keys(i)]
    assert keys == [k for i in range(b.num_shards) for k in b.shard_keys(i)]
    for k in keys:
        fa, fb = np.asarray(a.features(k)), np.asarray(b.features(k))
        assert fa.dtype == fb.dtype and fa.tobytes() == fb.tobytes(), k  # bit-identical


def _assert_same_student(ref: str, got: str) -> None:
    import s3fs
    from safetensors.numpy import load

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    wa = load(fs.cat(f"{ref.removeprefix('s3://')}/student.safetensors"))
    wb = load(fs.cat(f"{got.removeprefix('s3://')}/student.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _assert_same_eval(ref: dict[str, str], got: dict[str, str]) -> None:
    from mlflow import MlflowClient

    ma = MlflowClient(ref["db"]).get_run(ref["run_id"]).data.metrics
    mb = MlflowClient(got["db"]).get_run(got["run_id"]).data.metrics
    fid = sorted(k for k in ma if k.startswith("fidelity/"))
    assert fid, sorted(ma)
    for k in fid:
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-7), k
