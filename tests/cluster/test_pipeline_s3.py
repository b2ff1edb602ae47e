"""`spar submit pipeline` of the demo recipe on the three-node cluster with no shared disk: raw images,
image sets, caches, Ray Train storage, the student and eval outputs all under one ``s3://`` workdir (moto), MLflow
through the tracking server (artifacts on S3). The result equals the same recipe run on one machine with a local
workdir: the same cache fingerprints and equal features.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cluster.conftest import BUCKET, Cluster
from tests.e2e.conftest import ROOT, SPAR, clean_env, run_spar

pytestmark = pytest.mark.slow  # the whole pipeline twice, one of them on three Ray nodes

SETS = ["--set", "distill.max_steps=6", "--set", "distill.checkpoint_every=3"]
DONE = re.compile(r"\[spar pipeline\] done: cache (\S+), student (\S+), MLflow run (\w+)")


def test_demo_pipeline_on_the_cluster_equals_one_machine(cluster: Cluster, tmp_path: Path, capsys):
    from pipeline.cache.reader import open_cache
    from pipeline.common.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS, write_photos

    raw = f"s3://{BUCKET}/demo-raw"
    write_photos(tmp_path / "raw" / "train", TRAIN_PHOTOS)
    write_photos(tmp_path / "raw" / "heldout", HELDOUT_PHOTOS)
    with cluster.s3.environ():
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.put(str(tmp_path / "raw") + "/", f"{raw}/", recursive=True)
    sources = ["--source", f"{raw}/train", "--set", f"run.heldout_source={raw}/heldout"]

    # one machine: local Ray, a local workdir, the embedded MLflow store
    t = time.monotonic()
    local = clean_env(**cluster.s3.env())
    r = run_spar(["pipeline", "--config", "jobs/configs/demo.toml", "--workdir", str(tmp_path / "local"),
                  *sources, *SETS], local, timeout=1500)  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    local_s = time.monotonic() - t
    local_cache = DONE.search(r.stdout + r.stderr).group(1)

    # the cluster: everything under an s3:// workdir
    workdir = f"s3://{BUCKET}/demo"
    t = time.monotonic()
    r = subprocess.run(
        [*SPAR, "submit", "--address", cluster.address, "--working-dir", str(ROOT), "pipeline",
         "--config", "jobs/configs/demo.toml", "--workdir", workdir, *sources, *SETS],
        cwd=ROOT, env=cluster.client_env(), capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    output = r.stdout + r.stderr
    cluster_s = time.monotonic() - t
    assert r.returncode == 0 and re.search(r"job \S+ SUCCEEDED", output), output[-5000:]
    cache, student, run_id = DONE.search(output).groups()
    assert cache.startswith(f"{workdir}/") and student.startswith(f"{workdir}/"), (cache, student)

    with cluster.s3.environ():
        remote, ref = open_cache(cache), open_cache(local_cache)
        assert remote.fingerprint == ref.fingerprint and remote.is_complete()
        assert sorted(remote.keys()) == sorted(ref.keys())
        for k in ref.keys():
            np.testing.assert_array_equal(remote.features(k, verify=True), ref.features(k, verify=True), k)
        assert fs.exists(f"{student}/student.safetensors")

    import mlflow

    run = mlflow.MlflowClient(cluster.mlflow.url).get_run(run_id)
    assert run.info.status == "FINISHED"
    with capsys.disabled():
        print(
            f"\nPIPELINE-S3 one machine {local_s:.0f} s, cluster job {cluster_s:.0f} s, cache {remote.fingerprint}"
        )
