"""Security: nothing read back from storage is unpickled, names from data cannot escape the output directory.

Every planted pickle carries a payload that, if it were ever unpickled, would create a marker file; each test
asserts that the read is refused with a clear error and that the marker does not exist.

Covered elsewhere (not repeated): the local Ray head binds to 127.0.0.1 with token auth on and refuses
unauthenticated / wrong-token clients (tests/e2e/test_submit.py
``test_head_is_loopback_only_and_refuses_unauthenticated_clients``); the local MLflow server binds to 127.0.0.1 and,
in auth mode, answers 401 without or with wrong credentials (tests/e2e/test_infra.py
``test_local_mlflow_server_auth_mode``); the MLflow deployment (compose) requires basic auth, publishes only on
loopback and reads secrets from files (``test_mlflow_deployment_requires_auth_and_binds_loopback``); both local
scripts refuse non-loopback hosts (``test_local_scripts_refuse_non_loopback_hosts``); ingest keys are sanitised and
list-file traversal cannot escape (tests/pipeline/test_ingest.py ``test_keys_are_sanitised_and_unique``,
``test_path_traversal_cannot_escape_root``); ``safe_stem`` / ``out_path`` units (tests/pipeline/test_eval_inference.py).
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.reliability.conftest import REPO, assert_user_error, run_main


class Payload:
    """Unpickling this creates ``marker`` (io.open(marker, "w")): proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (io.open, (self.marker, "w"))


def pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"weights": Payload(marker)}, protocol=4)


def torch_pickle_bytes(marker: Path) -> bytes:
    """A torch.save zip archive whose data.pkl carries the payload (what a malicious .pt file looks like)."""
    buf = io.BytesIO()
    torch.save({"visual.proj": Payload(marker)}, buf)
    return buf.getvalue()


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a planted pickle was executed"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    from pipeline.student.format import StudentMeta, save_student
    from spar_core.backbones import build_backbone

    bb = build_backbone("tiny-clip-64")
    bb.set_trainable(2)
    return save_student(bb, tmp_path_factory.mktemp("sec") / "student", StudentMeta(2))


@pytest.fixture
def photo(tmp_path) -> Path:
    p = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8)).save(p)
    return p


# ------------------------------------------------------------------------------------------ planted pickles


@pytest.mark.parametrize("fmt", ["pickle", "torch-zip"])
@pytest.mark.parametrize("checksums", ["stale", "rewritten-by-attacker"])
def test_pickle_as_student_weights_is_refused(student_dir, tmp_path, marker, photo, capsys, fmt, checksums):
    from pipeline.student.format import write_checksums

    d = tmp_path / "ckpt"
    shutil.copytree(student_dir, d)
    (d / "student.safetensors").write_bytes(
        pickle_bytes(marker) if fmt == "pickle" else torch_pickle_bytes(marker)
    )
    if checksums == "rewritten-by-attacker":
        write_checksums(d)
    out = tmp_path / "out"
    r = run_main(
        ["segment", str(photo), "--classes", "a;b", "--checkpoint", str(d), "--out", str(out)], capsys
    )
    assert_user_error(r, "student.safetensors")
    assert not list(out.glob("*.png")) if out.exists() else True


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_pickle_as_pretrained_weights_file_is_refused(tmp_path, marker, photo, capsys, suffix):
    w = tmp_path / f"weights{suffix}"
    w.write_bytes(torch_pickle_bytes(marker))
    r = run_main(["segment", str(photo), "--classes", "a;b", "--backbone", "tiny-clip-64", "--pretrained", str(w),
                  "--out", str(tmp_path / "out")], capsys)  # fmt: skip
    assert_user_error(r, w.name)


def test_pickle_in_a_training_checkpoint_is_refused_and_the_previous_one_used(student_dir, tmp_path, marker):
    from pipeline.student.format import CheckpointError, StudentMeta, write_checksums
    from pipeline.train.run_dir import restore_latest_good
    from pipeline.train.state import (
        TrainState,
        checkpoint_dir_name,
        load_training_checkpoint,
        save_training_checkpoint,
    )
    from spar_core.backbones import build_backbone

    bb = build_backbone("tiny-clip-64")
    bb.set_trainable(2)
    for step in (1, 2):
        save_training_checkpoint(
            bb, tmp_path / checkpoint_dir_name(step), TrainState(step=step), StudentMeta(2)
        )
    bad = tmp_path / checkpoint_dir_name(2)
    (bad / "train_state.safetensors").write_bytes(pickle_bytes(marker))
    write_checksums(bad)  # the attacker also fixes the checksums
    with pytest.raises(CheckpointError, match="cannot read"):
        load_training_checkpoint(bad)
    logged: list[str] = []
    from ray.train import Checkpoint

    found = restore_latest_good(Checkpoint(path=str(tmp_path / checkpoint_dir_name(2))), log=logged.append)
    assert found is not None and found[0].step == 1
    assert len(logged) == 1 and checkpoint_dir_name(2) in logged[0]


@pytest.mark.parametrize("target", ["spec.json", "manifest.json", "marker", "chunk"])
def test_pickle_planted_in_a_cache_is_never_unpickled(rel_reference_cache, tmp_path, marker, capsys, target):
    from pipeline.cache.reader import open_cache
    from pipeline.cache.spec import CacheError

    path = tmp_path / Path(rel_reference_cache).name
    shutil.copytree(rel_reference_cache, path)
    shard = path / "shards" / "shard-000001.zarr"
    f = {
        "spec.json": path / "spec.json",
        "manifest.json": shard / "manifest.json",
        "marker": path / "shards" / "shard-000001.done",
        "chunk": sorted(p for p in (shard / "features" / "c").rglob("*") if p.is_file())[0],
    }[target]
    f.write_bytes(pickle_bytes(marker))
    r = run_main(["cache", "verify", str(path)], capsys)
    if target == "spec.json":
        assert_user_error(r, "spec.json", "not valid JSON")
        with pytest.raises(CacheError, match="not valid JSON"):
            open_cache(str(path))
        return
    assert r.rc == 1 and "BAD shard-000001: " in r.out, r.out + r.err
    c = open_cache(str(path))
    with pytest.raises(Exception):  # noqa: B017 - refused (message quality: test_cache_integrity.py)
        for _k, _v in c.iter_shard(1, verify=True):
            pass


@pytest.mark.parametrize("target", ["manifest.parquet", "imageset.json"])
def test_pickle_planted_in_an_image_set_is_never_unpickled(rel_imageset, tmp_path, marker, capsys, target):
    from pipeline.data.imageset import open_imageset

    root = tmp_path / "set"
    shutil.copytree(rel_imageset, root)
    images = root / "images"
    (images / target).write_bytes(pickle_bytes(marker))
    with pytest.raises(Exception) as ei:  # noqa: PT011 - any refusal, as long as it names the file
        open_imageset(str(root))
    assert target in str(ei.value) or "image set" in str(ei.value)
    r = run_main(["precompute", "--images", str(root), "--teacher", "tiny-clip-64", "--cache-root",
                  str(tmp_path / "c")], capsys)  # fmt: skip
    assert_user_error(r)


def test_no_unsafe_deserialisation_in_the_code():
    """No pickle.load(s), torch.load without weights_only=True, np.load with allow_pickle=True or pandas
    read_pickle anywhere in the project's own code."""
    bad = []
    patterns = [
        (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
        (re.compile(r"\bcloudpickle\.loads?\("), "cloudpickle.load"),
        (re.compile(r"read_pickle\("), "read_pickle"),
        (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
        (re.compile(r"\bdill\.loads?\("), "dill.load"),
    ]
    for d in ("pipeline", "spar_core", "jobs"):
        for p in sorted((REPO / d).rglob("*.py")):
            text = p.read_text()
            for rx, what in patterns:
                if rx.search(text):
                    bad.append(f"{p.relative_to(REPO)}: {what}")
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    bad.append(f"{p.relative_to(REPO)}: torch.load without weights_only=True")
    assert bad == []


# ------------------------------------------------------------------------------------------ hostile names

HOSTILE = [
    "$(touch PWNED).png",
    "a;rm -rf x.png",
    "line\nbreak.png",
    "..png",
    "...png",
    ".hidden.png",
    "..\\..\\evil.png",
    "日本語の写真.png",
    "x" * 200 + ".png",
    "-rf.png",
    " lead space.png",
]


def _hostile_tree(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    (src / "deep" / "er").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i, name in enumerate(HOSTILE):
        Image.fromarray(rng.integers(0, 255, (48 + 16 * (i % 3), 64, 3), np.uint8)).save(
            src / name, format="PNG"
        )
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(
        src / "deep" / "er" / "..png", format="PNG"
    )
    outside = tmp_path / "outside.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(outside)
    (src / "link.png").symlink_to(outside)  # a symlink to a file outside the input tree
    return src


def _new_files(root: Path, before: set[Path]) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()} - before


def test_segment_with_hostile_file_names_writes_only_inside_out(tmp_path, capsys, monkeypatch):
    src = _hostile_tree(tmp_path)
    monkeypatch.chdir(src)  # relative "../" names would resolve from here
    files = sorted(str(p) for p in src.rglob("*.png"))
    out = tmp_path / "seg"
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    r = run_main(["segment", *files, "--classes", "a;b", "--backbone", "tiny-clip-64", "--short-side", "48",
                  "--out", str(out)], capsys)  # fmt: skip
    assert r.rc == 0, r.err[-2000:]
    new = _new_files(tmp_path, before)
    assert new and all(out in p.parents for p in new), sorted(
        map(str, new - {p for p in new if out in p.parents})
    )
    for p in new:
        assert p.parent == out and "\n" not in p.name and not p.name.startswith((".", " ")), p.name
        assert len(p.name.encode()) <= 255
    assert len([p for p in new if p.name.endswith("_labels.png")]) == len(
        files
    )  # one per input, no overwrite
    assert not list(tmp_path.rglob("PWNED*")) and not Path("/tmp/evil.png").exists()


def test_ingest_with_hostile_file_names_keeps_keys_and_files_inside(tmp_path, capsys):
    src = _hostile_tree(tmp_path)
    out = tmp_path / "set"
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    r = run_main(["ingest", str(src), "--out", str(out), "--quiet", "--set", "target_long=128", "--set",
                  "target_short=64", "--set", "min_short=48", "--set", "shard_size=4"], capsys)  # fmt: skip
    assert r.rc == 0, r.err[-2000:]
    new = _new_files(tmp_path, before)
    assert new and all(out in p.parents for p in new)
    from pipeline.data.imageset import open_imageset

    ims = open_imageset(str(out))
    keys = [rec.key for rec in ims.records]
    assert len(keys) == len(HOSTILE) + 2 == len(set(keys))
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) and len(k) <= 96 for k in keys), keys
    import tarfile

    for i in range(ims.num_shards):
        with tarfile.open(ims.shard_url(i)) as tf:
            for m in tf.getmembers():
                assert m.isfile() and re.fullmatch(r"[A-Za-z0-9_-]+\.(png|json)", m.name), m.name


def test_hostile_class_names_stay_data(tmp_path, capsys):
    """Class names with path separators, dots and shell syntax become labels, never paths: eval writes its files
    and MLflow artifacts only inside its own folders."""
    from tests.pipeline.test_datasets import make_voc

    voc = tmp_path / "voc"
    lab = np.kron(np.array([[0, 0, 5, 5], [15, 15, 0, 255]]), np.ones((16, 16), int)).astype(np.uint8)
    make_voc(voc, {"2007_000001": lab, "2007_000002": lab[::-1].copy()})
    names = ["background", "../../../../tmp/evil", "a/b/c", "..", "$(touch PWNED)", "..\\x", "/etc/passwd",
             "x" * 300] + [f"c{i}" for i in range(13)]  # fmt: skip
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(names) + "\n")
    work, out = tmp_path / "work", tmp_path / "evalout"
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    r = run_main(["eval", "--dataset", "voc21", "--data-root", str(voc), "--baseline", "--backbone", "tiny-clip-64",
                  "--classes-file", str(classes), "--short-side", "32", "--templates", "simple", "--workdir",
                  str(work), "--out", str(out), "--overlays", "2"], capsys)  # fmt: skip
    assert r.rc == 0, r.err[-3000:]
    new = _new_files(tmp_path, before)
    assert new and all(work in p.parents or out in p.parents for p in new), sorted(map(str, new))
    assert not Path("/tmp/evil").exists() and not list(tmp_path.rglob("PWNED*"))
    results = json.loads((out / "results.json").read_text())
    assert [c if isinstance(c, str) else c[0] for c in results["classes"]][:4] == names[:4]
