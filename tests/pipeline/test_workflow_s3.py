"""A run whose workdir is an ``s3://`` prefix (moto's S3 server on 127.0.0.1): every file of the run goes under the
prefix, nothing to a local folder, and the results equal the same recipe run on a local workdir.

The data stages (ingest + precompute through :func:`pipeline.workflow.orchestrator.prepare_data`), a fidelity
evaluation and the segmentation of the held-out photos run in this process on the session's Ray cluster, from an
empty working folder, with the S3 endpoint and credentials in this process's environment only (Ray's workers get
them through the tasks' runtime environment, as on a cluster) and an MLflow store named as ``MLFLOW_TRACKING_URI``
names it (a URL workdir cannot hold the embedded SQLite store). The reference is the same recipe on a local
workdir, with its fidelity report. The student evaluated is a checkpoint built here with the local code (training
on S3 is the train package's own test).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.reader import open_cache
from pipeline.common import storage, tracking
from pipeline.common.photos import TRAIN_PHOTOS, write_photos
from pipeline.data.imageset import open_imageset
from pipeline.eval.config import SegmentConfig
from pipeline.eval.segment import segment_images
from pipeline.student.format import StudentMeta, save_student
from pipeline.workflow.config import load_recipe
from tests.builders import moto_s3, perturbed_student
from tests.conftest import load_photo
from tests.e2e.conftest import ROOT

BUCKET = "spar-wf"
DEMO = str(ROOT / "jobs" / "configs" / "demo.toml")
OVERRIDES = ["ingest.target_long=128", "ingest.target_short=96", "ingest.shard_size=2"]
TRAIN, HELD = ("rocket", "horse", "camera"), ("astronaut", "coffee")
SEG = {"classes": "sky;person;cup;ground", "short_side": 64, "templates": "simple"}


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    """moto's S3 server on 127.0.0.1 with one bucket; endpoint and credentials in this process's environment."""
    with moto_s3(BUCKET) as (fs, _env):
        yield fs


def _photos(d: Path, names: tuple[str, ...]) -> Path:
    d.mkdir(parents=True)
    for n in names:
        Image.fromarray(load_photo(n)).save(d / f"{n}.png")
    return d


def _student(path: Path) -> str:
    """A tiny-clip-64 student (the demo teacher's backbone) whose last two blocks moved: built with local code."""
    bb = perturbed_student(seed=5)
    return str(save_student(bb, path, StudentMeta(2)))


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory: pytest.TempPathFactory, ray_local) -> dict[str, Any]:
    """The S3 run's results and the local reference's, with the paths and stores the tests look at."""
    import mlflow

    base = tmp_path_factory.mktemp("wf-s3")
    train, held = _photos(base / "src" / "train", TRAIN), _photos(base / "src" / "held", HELD)
    for d in (train, held):
        for p in sorted(d.iterdir()):
            s3.put_file(str(p), f"{BUCKET}/src/{d.name}/{p.name}")
    cwd = base / "cwd"  # the S3 run's working folder: must stay empty
    cwd.mkdir()
    uri = f"sqlite:///{base / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)  # stands in for a tracking server: it decides where artifacts go
    exp = client.create_experiment("spar-s3", artifact_location=(base / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="training").info.run_id
    work = f"s3://{BUCKET}/demo"
    args = {
        "recipe": DEMO,
        "overrides": OVERRIDES,
        "runs": {
            "local": {
                "workdir": str(base / "local"),
                "source": str(train),
                "heldout_source": str(held),
                "experiment": "spar-local",
            },
            "s3": {
                "workdir": work,
                "source": f"s3://{BUCKET}/src/train",
                "heldout_source": f"s3://{BUCKET}/src/held",
                "experiment": "spar-s3",
            },
        },
        "checkpoint": (checkpoint := _student(base / "student")),
        "fidelity": dict(
            fidelity=True,
            checkpoint=checkpoint,
            precision="fp32",
            overlays=2,
            classes=SEG["classes"],
            templates="simple",
            experiment="spar-s3",
        ),
        "workdir": work,
        "eval_out": f"{work}/eval/fidelity",
        "local_eval_out": str(base / "local-eval"),
        "parent_run": parent,
        "segment": {**SEG, "out": ""},
    }
    local = _local_reference(args)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # nothing of the S3 run may land in the working folder
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(tracking, "_USER_TRACKING_URI", uri)  # as if set when the process started
        out = _s3_run(args)
    return {**out, **local, "args": args, "base": base, "cwd": cwd, "uri": uri, "work": work, "held": held}


def _s3_run(args: dict[str, Any]) -> dict[str, Any]:
    """prepare_data on the S3 workdir, the fidelity report of the student against the S3 data with its files to
    S3, and the held-out photos (an S3 folder) segmented into <S3 workdir>/overlays, logged on the "training" run.
    """
    import dataclasses
    import types

    from pipeline.eval.benchmark import run_eval
    from pipeline.eval.config import EvalConfig
    from pipeline.workflow.orchestrator import Reporter, heldout_photos, prepare_data, stage_segment

    recipe = load_recipe(args["recipe"], args["overrides"], run_flags=args["runs"]["s3"])
    s3 = dataclasses.asdict(prepare_data(recipe, reporter=Reporter("test")))
    fidelity = run_eval(EvalConfig(images=s3["heldout"], teacher_cache=s3["heldout_cache"], out=args["eval_out"],
                                   workdir=args["workdir"], parent_run=args["parent_run"], **args["fidelity"]))  # fmt: skip
    run = types.SimpleNamespace(checkpoint=args["checkpoint"], run_id=args["parent_run"], segments=[])
    stage_segment(args["workdir"], run, SegmentConfig(**args["segment"]), heldout_photos(s3["heldout_source"]),
                  Reporter("test"))  # fmt: skip
    return {"s3": s3, "fidelity": fidelity, "segments": run.segments}


def _local_reference(args: dict[str, Any]) -> dict[str, Any]:
    """prepare_data on the local workdir and the student's fidelity report against it (written to a local folder,
    which the tests read; no MLflow)."""
    import dataclasses

    from pipeline.eval.benchmark import run_eval
    from pipeline.eval.config import EvalConfig
    from pipeline.workflow.orchestrator import Reporter, prepare_data

    recipe = load_recipe(args["recipe"], args["overrides"], run_flags=args["runs"]["local"])
    loc = dataclasses.asdict(prepare_data(recipe, reporter=Reporter("test")))
    run_eval(EvalConfig(images=loc["heldout"], teacher_cache=loc["heldout_cache"], out=args["local_eval_out"],
                        mlflow=False, **args["fidelity"]))  # fmt: skip
    return {"local": loc}


def test_prepare_data_on_s3_equals_the_local_run_and_writes_nothing_locally(runs, s3) -> None:
    loc, rem, work = runs["local"], runs["s3"], runs["work"]
    assert rem["images"] == f"{work}/images/train" and rem["heldout"] == f"{work}/images/heldout"
    for key in ("cache", "heldout_cache"):  # same fingerprint, under <workdir>/cache
        assert rem[key] == f"{work}/cache/{Path(loc[key]).name}"
    for key in ("images", "heldout"):
        a, b = open_imageset(loc[key]), open_imageset(rem[key])
        assert a.fingerprint == b.fingerprint and a.num_shards == b.num_shards
    for key in ("cache", "heldout_cache"):
        a, b = open_cache(loc[key]), open_cache(rem[key])
        assert b.is_complete() and a.spec == b.spec and sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            np.testing.assert_array_equal(np.asarray(b.features(k, verify=True)), np.asarray(a.features(k)))
    assert {p.rsplit("/", 1)[-1] for p in s3.ls(f"{BUCKET}/demo")} == {"images", "cache", "eval", "overlays"}
    assert _tree(runs["cwd"]) == []  # no "s3:" folder, no MLflow store, no overlays in the working folder
    assert not [p for p in _tree(runs["base"]) if "s3:" in p]


def test_eval_and_segment_outputs_go_to_the_s3_workdir(runs, s3, tmp_path: Path) -> None:
    import mlflow

    work, fid = runs["work"], runs["fidelity"]
    stored = json.loads(storage.read_bytes(f"{work}/eval/fidelity/fidelity.json"))
    assert stored == fid  # the report's file on S3 is the report returned
    # the same student against the same data on local disk, files to a local folder: the same report
    assert json.loads((Path(runs["args"]["local_eval_out"]) / "fidelity.json").read_text()) == fid
    assert fid["images"] == 2 and fid["student"]["mse"] != fid["baseline"]["mse"]
    pca = storage.listdir(f"{work}/eval/fidelity/pca")
    assert len(pca) == 2 and all(p.endswith("_pca.png") for p in pca)
    for name in pca:
        assert _png(f"{work}/eval/fidelity/pca/{name}").ndim == 3
    # the evaluation's MLflow run: a child of the training run, its artifacts logged from the staged folder
    client = mlflow.MlflowClient(runs["uri"])
    parent = runs["args"]["parent_run"]
    (child,) = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert child.data.tags["spar.eval"] == "fidelity"
    got = mlflow.artifacts.download_artifacts(
        run_id=child.info.run_id,
        artifact_path="fidelity.json",
        dst_path=str(tmp_path),
        tracking_uri=runs["uri"],
    )
    assert json.loads(Path(got).read_text()) == fid
    logged = sorted(f.path for f in client.list_artifacts(child.info.run_id, "pca"))
    assert logged == [f"pca/{n}" for n in pca]

    # segmentation of the held-out photos (an s3 folder) into <workdir>/overlays, against the same photos
    # segmented from local files into a local folder
    assert sorted(storage.listdir(f"{work}/overlays")) == sorted(
        ["classes.json"] + [f"{n}_{kind}.png" for n in HELD for kind in ("labels", "overlay")]
    )
    ref = segment_images(
        [str(runs["held"] / f"{n}.png") for n in HELD],
        SegmentConfig(**SEG, checkpoint=runs["args"]["checkpoint"], out=str(tmp_path / "seg")),
    )
    for rec, want in zip(sorted(runs["segments"], key=lambda r: r["image"]), ref, strict=True):
        name = Path(want["image"]).name
        assert rec["image"] == f"s3://{BUCKET}/src/held/{name}"
        assert rec["overlay"] == f"{work}/overlays/{Path(want['overlay']).name}"
        assert rec["classes_present"] == want["classes_present"]
        np.testing.assert_array_equal(_png(rec["labels"]), np.asarray(Image.open(want["labels"])))
        np.testing.assert_array_equal(_png(rec["overlay"]), np.asarray(Image.open(want["overlay"])))
    logged = [f.path for f in client.list_artifacts(parent, "images") if "overlay" in f.path]
    assert len(logged) >= len(HELD)  # the overlays, as MLflow images of the training run


def _png(url: str) -> np.ndarray:
    raw = storage.read_bytes(url)
    assert raw is not None, f"{url} is missing"
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im)


def test_sample_photos_of_an_s3_workdir_go_under_its_raw_prefix(s3, tmp_path: Path) -> None:
    """With no source in the recipe the bundled photos are written under <workdir>/raw (not to a local folder)."""
    from pipeline.workflow.orchestrator import _sources

    recipe = load_recipe(DEMO, [], run_flags={"workdir": f"s3://{BUCKET}/raw-test"})
    source, held = _sources(recipe, f"s3://{BUCKET}/raw-test")
    assert (source, held) == (f"s3://{BUCKET}/raw-test/raw/train", f"s3://{BUCKET}/raw-test/raw/heldout")
    n = write_photos(tmp_path / "ref", TRAIN_PHOTOS)  # reference: the same photos written to a local folder
    assert storage.listdir(source) == sorted(p.name for p in (tmp_path / "ref").iterdir()) and n > 0
    for p in (tmp_path / "ref").iterdir():
        assert storage.read_bytes(f"{source}/{p.name}") == p.read_bytes()
    assert len(storage.listdir(held)) == 3


def test_s3_workdir_without_a_tracking_server_is_refused_before_anything_starts(
    s3, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Through the CLI's ``main(argv)`` in-process (the one ``spar`` process per command is in
    tests/reliability/test_bad_input.py)."""
    from tests.reliability.conftest import run_main

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = run_main(["pipeline", "--config", DEMO, "--workdir", f"s3://{BUCKET}/nope"], capsys)
    assert res.rc == 2, res.err[-3000:]
    err = res.err.strip().splitlines()
    assert len(err) == 1 and f"s3://{BUCKET}/nope" in err[0] and "MLFLOW_TRACKING_URI" in err[0]
    s3.invalidate_cache()
    assert s3.exists(BUCKET) and not s3.exists(f"{BUCKET}/nope")
    assert _tree(cwd) == []
