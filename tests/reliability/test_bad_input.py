"""Bad input through every entry point of the real ``spar`` command.

Each case runs ``pipeline.cli.main(argv)`` (the console script's entry) in-process and must end with exit code 2 and
exactly one ``spar <command>: error: ...`` line naming the input and what is wrong, no traceback, and nothing
partially written left looking complete (no image-set manifest, no cache completion marker, no exported student, no
segmentation output). A few representative cases also run as a separate ``python -m pipeline.cli`` process.

Already covered elsewhere (not repeated): corrupt / empty / fake / decompression-bomb / sliver / GIF images and
every PIL mode through ingest (tests/pipeline/test_ingest.py ``test_mixed_set_counts_and_reasons``,
``test_image_modes_are_converted_correctly``); bad class lists, unreadable images and a missing checkpoint through
segment (tests/pipeline/test_eval_inference.py); a missing data root and bad class files through eval
(tests/pipeline/test_eval.py ``test_bad_input``).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.builders import make_imageset, perturbed_student
from tests.reliability.conftest import REPO, assert_user_error, cli_env, run_main


@pytest.fixture(autouse=True)
def _ray(ray_up):
    return ray_up


@dataclass
class Env:
    tmp: Path
    images: str
    other: str
    cache: str
    student: str
    photo: str


@pytest.fixture(scope="module")
def env(tmp_path_factory, rel_imageset, rel_reference_cache) -> Env:
    """Good inputs to break one at a time: an image set, its cache, another image set, a student checkpoint."""

    from pipeline.student.format import StudentMeta, save_student

    tmp = tmp_path_factory.mktemp("bad-input")
    other = make_imageset(tmp / "other", n=8, shard_size=2, seed=5)
    bb = perturbed_student(scale=0.01)
    student = save_student(bb, tmp / "student", StudentMeta(2))
    (tmp / "imgs").mkdir()
    photo = tmp / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 112, 3), np.uint8)).save(photo)
    return Env(tmp, rel_imageset, other, rel_reference_cache, str(student), str(photo))


def _recipe(tmp: Path, text: str) -> str:
    p = tmp / f"recipe-{abs(hash(text)) % 10**8}.toml"
    p.write_text(text)
    return str(p)


def _pc(e: Env, out: Path, *extra: str) -> list[str]:
    return ["precompute", "--images", e.images, "--teacher", "tiny-clip-64", "--crop", "64", "--stride", "32",
            "--cache-root", str(out), "--set", "autocast=none", "--set", "progress=false", *extra]  # fmt: skip


def _seg(e: Env, out: Path, *extra: str) -> list[str]:
    return ["segment", e.photo, "--classes", "sky;road", "--backbone", "tiny-clip-64", "--short-side", "64",
            "--out", str(out), *extra]  # fmt: skip


def _distill(e: Env, out: Path, *extra: str) -> list[str]:
    return ["distill", "--images", e.images, "--cache", e.cache, "--workdir", str(out), "--workers", "1",
            "--set", "max_steps=1", *extra]  # fmt: skip


def _doctored_student(e: Env, name: str, change: Callable[[dict], None]) -> str:
    """A copy of the student checkpoint with backbone.json edited (checksums rewritten to match)."""
    import shutil

    from pipeline.student.format import write_checksums

    d = e.tmp / name
    if not d.exists():
        shutil.copytree(e.student, d)
        info = json.loads((d / "backbone.json").read_text())
        change(info)
        (d / "backbone.json").write_text(json.dumps(info))
        write_checksums(d)
    return str(d)


def _other_backbone(info: dict) -> None:
    """Recorded as a student of another architecture (ViT-S-16): its tensors do not fit that backbone."""
    info.update(name="ViT-S-16", weights_id="random:ViT-S-16:seed0")


def _other_base(info: dict) -> None:
    info.update(seed=3)  # the base weights the student was trained from are other ones


def _image(e: Env, name: str, make: Callable[[Path], None]) -> str:
    p = e.tmp / "imgs" / name
    p.parent.mkdir(exist_ok=True)
    if not p.exists():
        make(p)
    return str(p)


def _truncated_png(p: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, format="PNG")
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _bomb_png(p: Path) -> None:
    Image.new("1", (20000, 20000)).save(p)  # 400 Mpx decoded, a few kB on disk


# (id, argv builder (env, out dir) -> argv, needles of the one-line error)
CASES: list[tuple[str, Callable[[Env, Path], list[str]], tuple[str, ...]]] = [
    # ---- malformed recipes and overrides
    ("recipe-unknown-key", lambda e, o: _pc(e, o, "--config", _recipe(e.tmp, "[precompute]\nstrides = 8\n")),
     ("unknown config key", "strides")),
    ("recipe-wrong-type", lambda e, o: _pc(e, o, "--config", _recipe(e.tmp, '[precompute]\nwindow_batch = "big"\n')),
     ("window_batch", "integer")),
    ("recipe-not-toml", lambda e, o: _pc(e, o, "--config", _recipe(e.tmp, "[precompute\nstride = 8\n")),
     ("not valid TOML",)),
    ("recipe-missing", lambda e, o: _pc(e, o, "--config", str(e.tmp / "nope.toml")), ("nope.toml", "not found")),
    ("negative-stride", lambda e, o: _pc(e, o, "--set", "stride=-8"), ("stride", "> 0", "-8")),
    ("negative-stride-flag", lambda e, o: _pc(e, o)[:-6] + ["--stride", "-16", "--cache-root", str(o)],
     ("stride", "-16")),
    ("crop-larger-than-images", lambda e, o: _pc(e, o)[:6] + ["256", *_pc(e, o)[7:]], ("256", "larger than")),
    ("crop-not-patch-multiple", lambda e, o: _pc(e, o)[:6] + ["40", *_pc(e, o)[7:]], ("crop", "40")),
    ("override-without-equals", lambda e, o: _pc(e, o, "--set", "stride"), ("stride", "key=value")),
    ("override-bad-literal", lambda e, o: _pc(e, o, "--set", "dtype=float8"), ("dtype", "float8")),
    ("ingest-zero-shard-size", lambda e, o: ["ingest", e.photo, "--out", str(o), "--set", "shard_size=0"],
     ("shard_size",)),
    ("ingest-recipe-unknown", lambda e, o: ["ingest", e.photo, "--out", str(o), "--config",
                                            _recipe(e.tmp, "[ingest]\ntarget_longest = 5\n")],
     ("target_longest",)),
    ("distill-zero-epochs", lambda e, o: _distill(e, o, "--set", "epochs=0"), ("epochs",)),
    ("distill-bad-float", lambda e, o: _distill(e, o, "--set", "lr=fast"), ("lr", "fast")),
    ("distill-too-many-blocks", lambda e, o: _distill(e, o, "--set", "trainable_blocks=9"),
     ("trainable_blocks", "9")),
    ("segment-negative-stride", lambda e, o: _seg(e, o, "--mode", "sliding", "--stride", "-4"), ("stride",)),
    ("eval-prob-thd", lambda e, o: ["eval", "--dataset", "voc21", "--data-root", str(e.tmp), "--baseline",
                                    "--backbone", "tiny-clip-64", "--set", "prob_thd=2", "--workdir", str(o)],
     ("prob_thd",)),
    ("pipeline-unknown-section", lambda e, o: ["pipeline", "--config", _recipe(e.tmp, "[trainn]\nlr = 1\n"),
                                               "--workdir", str(o)], ("trainn",)),
    ("pipeline-unknown-key", lambda e, o: ["pipeline", "--config", _recipe(e.tmp, "[distill]\nlrate = 1\n"),
                                           "--workdir", str(o)], ("lrate",)),
    ("pipeline-negative-stride", lambda e, o: ["pipeline", "--config", _recipe(e.tmp, "[precompute]\nstride = -4\n"),
                                               "--workdir", str(o)], ("stride",)),
    ("pipeline-override-no-section", lambda e, o: ["pipeline", "--config", _recipe(e.tmp, "[run]\n"), "--set",
                                                   "lr=1", "--workdir", str(o)], ("lr=1", "section")),
    ("demo-negative-steps", lambda e, o: ["demo", "--workdir", str(o), "--steps", "-3"], ("steps",)),
    # ---- nonexistent or unusable paths
    ("ingest-missing-src", lambda e, o: ["ingest", str(e.tmp / "no-such-dir"), "--out", str(o)],
     ("no-such-dir",)),
    ("ingest-src-under-a-file", lambda e, o: ["ingest", e.photo + "/sub", "--out", str(o)], ("photo.png/sub",)),
    ("ingest-out-is-a-file", lambda e, o: ["ingest", str(Path(e.images).parent / "src"), "--out", e.photo],
     ("photo.png",)),
    ("precompute-missing-images", lambda e, o: ["precompute", "--images", str(e.tmp / "gone"), "--teacher",
                                                "tiny-clip-64", "--cache-root", str(o)], ("gone",)),
    ("precompute-images-is-a-file", lambda e, o: ["precompute", "--images", e.photo, "--teacher", "tiny-clip-64",
                                                  "--cache-root", str(o)], ("photo.png",)),
    ("precompute-unknown-teacher", lambda e, o: ["precompute", "--images", e.images, "--teacher", "vit-huge-9000",
                                                 "--cache-root", str(o)], ("vit-huge-9000",)),
    ("precompute-missing-weights-file", lambda e, o: _pc(e, o, "--pretrained", str(e.tmp / "w.safetensors")),
     ("w.safetensors",)),
    ("cache-verify-not-a-cache", lambda e, o: ["cache", "verify", str(e.tmp)], ("not a teacher cache",)),
    ("cache-rm-not-a-cache", lambda e, o: ["cache", "rm", e.images], ("not a teacher cache", "refusing")),
    ("distill-missing-images", lambda e, o: ["distill", "--images", str(e.tmp / "gone"), "--cache", e.cache,
                                             "--workdir", str(o)], ("gone",)),
    ("distill-missing-cache", lambda e, o: ["distill", "--images", e.images, "--cache", str(e.tmp / "nocache"),
                                            "--workdir", str(o)], ("nocache", "not a teacher cache")),
    ("distill-resume-nothing", lambda e, o: _distill(e, o, "--resume"), ("--resume",)),
    ("segment-directory-as-image", lambda e, o: _seg(e, o)[:1] + [str(e.tmp / "imgs")] + _seg(e, o)[2:], ("imgs",)),
    ("embed-missing-image", lambda e, o: ["embed", str(e.tmp / "x.png"), "--backbone", "tiny-clip-64",
                                          "--out", str(o)], ("x.png",)),
    # ---- bad images through segment / embed (ingest's are in tests/pipeline/test_ingest.py)
    ("segment-truncated-png", lambda e, o: _seg(e, o)[:1] + [_image(e, "trunc.png", _truncated_png)]
     + _seg(e, o)[2:], ("trunc.png",)),
    ("segment-empty-file", lambda e, o: _seg(e, o)[:1] + [_image(e, "empty.png", lambda p: p.write_bytes(b""))]
     + _seg(e, o)[2:], ("empty.png",)),
    ("segment-decompression-bomb", lambda e, o: _seg(e, o)[:1] + [_image(e, "bomb.png", _bomb_png)]
     + _seg(e, o)[2:], ("bomb.png",)),
    ("embed-decompression-bomb", lambda e, o: ["embed", _image(e, "bomb.png", _bomb_png), "--backbone",
                                               "tiny-clip-64", "--out", str(o)], ("bomb.png",)),
    # ---- a cache paired with the wrong image set
    ("distill-wrong-image-set", lambda e, o: ["distill", "--images", e.other, "--cache", e.cache, "--workdir",
                                              str(o), "--set", "max_steps=1"], ("computed for image set",)),
    ("fidelity-wrong-image-set", lambda e, o: ["eval", "--fidelity", "--images", e.other, "--teacher-cache",
                                               e.cache, "--backbone", "tiny-clip-64", "--baseline", "--workdir",
                                               str(o), "--no-mlflow"], ("image set",)),
    # ---- a checkpoint for another backbone / other base weights
    ("segment-checkpoint-other-backbone", lambda e, o: ["segment", e.photo, "--classes", "a;b", "--checkpoint",
                                                        _doctored_student(e, "sother", _other_backbone),
                                                        "--out", str(o)], ("sother", "shape")),
    ("segment-checkpoint-other-base", lambda e, o: ["segment", e.photo, "--classes", "a;b", "--checkpoint",
                                                    _doctored_student(e, "sbase", _other_base), "--out", str(o)],
     ("base weights",)),
    ("eval-checkpoint-other-backbone", lambda e, o: ["eval", "--fidelity", "--images", e.images,
                                                     "--teacher-cache", e.cache, "--checkpoint",
                                                     _doctored_student(e, "sother", _other_backbone), "--workdir",
                                                     str(o), "--no-mlflow"], ("sother", "shape")),
]  # fmt: skip


def _looks_complete(out: Path) -> list[str]:
    """Files under ``out`` that a reader would take as a finished result."""
    if not out.exists():
        return []
    names = ("manifest.parquet", "imageset.json", "student.safetensors", "classes.json")
    found = [str(p) for p in out.rglob("*") if p.name in names or p.name.endswith(".done")]
    found += [str(p) for p in out.rglob("*_labels.png")] + [str(p) for p in out.rglob("*.npy")]
    return found


@pytest.mark.parametrize(("case", "argv", "needles"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(env, tmp_path, capsys, case, argv, needles):
    out = tmp_path / "out"
    r = run_main(argv(env, out), capsys)
    if case.startswith("segment-") and r.rc == 0:
        pytest.fail(f"{case}: accepted: {r.out[-500:]}")
    assert_user_error(r, *needles)
    assert _looks_complete(out) == []


def test_odd_images_through_segment_and_embed(env, tmp_path, capsys):
    """Tiny, odd-mode and 16-bit images are either segmented at their own size or refused on one line."""
    rng = np.random.default_rng(2)
    d = tmp_path / "odd"
    d.mkdir()
    rgb = rng.integers(0, 255, (48, 40, 3), np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(d / "gray16.png")
    Image.fromarray(rgb).convert("LA").save(d / "la.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png", transparency=0)
    Image.fromarray(rgb).convert("1").save(d / "bilevel.png")
    Image.fromarray(rgb[:3, :2]).save(d / "tiny.png")  # 3x2 pixels
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(d / "rgba.webp")
    files = sorted(d.iterdir())
    out = tmp_path / "seg"
    r = run_main(["segment", *map(str, files), "--classes", "a;b", "--backbone", "tiny-clip-64", "--short-side",
                  "64", "--out", str(out)], capsys)  # fmt: skip
    assert r.rc == 0, r.err[-2000:]
    for f in files:
        with Image.open(f) as im:
            w, h = im.size
        lab = np.asarray(Image.open(out / f"{f.stem}_labels.png"))
        assert lab.shape == (h, w) and lab.max() <= 1, f.name
    r = run_main(["embed", *map(str, files), "--backbone", "tiny-clip-64", "--short-side", "64", "--out",
                  str(tmp_path / "emb")], capsys)  # fmt: skip
    assert r.rc == 0, r.err[-2000:]
    assert len(list((tmp_path / "emb").glob("*.npy"))) == len(files)


def test_failing_ingest_leaves_no_image_set_that_looks_complete(env, tmp_path, capsys):
    """A source where every file is bad: the run reports it, and no readable image set claims those inputs."""
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.png").write_bytes(b"not a png")
    (src / "b.jpg").write_bytes(b"")
    r = run_main(["ingest", str(src), "--out", str(tmp_path / "out"), "--quiet"], capsys)
    assert "Traceback" not in r.err
    if r.rc == 0:  # accepted run: the summary says 0 accepted and the set holds no images
        from pipeline.data.imageset import open_imageset

        assert open_imageset(str(tmp_path / "out")).records == []
        assert "2 rejected" in r.out + r.err
    else:
        assert_user_error(r)
        assert _looks_complete(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------ as separate processes

# one representative refusal per command (precompute, distill, segment); every case runs in-process above
PROCESS_CASES = ["recipe-unknown-key", "distill-wrong-image-set", "segment-truncated-png"]


def test_bad_input_through_separate_spar_processes(env, tmp_path):
    """The same refusals from real `python -m pipeline.cli` processes (run two at a time): exit status 2, one
    error line on stderr, no traceback."""
    from tests.reliability.conftest import CliResult, kill_session

    by_id = {c[0]: c for c in CASES}
    pending = list(PROCESS_CASES)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    results: dict[str, CliResult] = {}
    while pending or running:
        while pending and len(running) < 2:
            cid = pending.pop(0)
            argv = by_id[cid][1](env, tmp_path / cid)
            p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], cwd=str(REPO), env=cli_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)  # fmt: skip
            running[cid] = (p, time.monotonic())
        for cid, (p, t0) in list(running.items()):
            if p.poll() is not None or time.monotonic() - t0 > 400:
                if p.poll() is None:
                    kill_session(p.pid)
                out, err = p.communicate()
                results[cid] = CliResult(p.returncode, out, err)
                del running[cid]
        time.sleep(0.2)
    for cid in PROCESS_CASES:
        assert_user_error(results[cid], *by_id[cid][2])
        assert _looks_complete(tmp_path / cid) == []
