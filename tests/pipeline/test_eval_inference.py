"""``spar segment`` / ``spar embed`` on real photographs (scikit-image samples), tiny random backbone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.eval.config import EmbedConfig
from pipeline.eval.model import InferenceError, protocol_size
from pipeline.eval.segment import embed_images, label_png, make_palette, out_path, safe_stem
from tests.conftest import load_photo
from tests.cv2_reference import cv2_fixed


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("in")
    (d / "sub").mkdir()
    paths = [d / "astronaut.png", d / "my photo (1).jpg", d / "sub" / "astronaut.png"]
    Image.fromarray(load_photo("astronaut")).save(paths[0])
    Image.fromarray(load_photo("coffee")).save(paths[1], quality=90)
    Image.fromarray(load_photo("chelsea")).save(paths[2])
    return paths


def test_segment_writes_png_of_input_size_with_labels_in_class_list(photo_files, tmp_path, capsys):
    out = tmp_path / "seg"
    rc = main(["segment", *map(str, photo_files), "--classes", "sky,clouds;person,people,astronaut;rocket",
               "--backbone", "tiny-clip-64", "--short-side", "64", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "astronaut_overlay.png", "astronaut_labels.png", "astronaut-1_overlay.png", "astronaut-1_labels.png",
        "my_photo__1__overlay.png", "my_photo__1__labels.png", "classes.json",
    ])  # fmt: skip
    for src, stem in zip(photo_files, ["astronaut", "my_photo__1_", "astronaut-1"], strict=True):
        h, w = np.asarray(Image.open(src)).shape[:2]
        with Image.open(out / f"{stem}_labels.png") as im:
            im.load()
            assert im.format == "PNG" and im.size == (w, h) and im.mode == "P"
            lab = np.asarray(im)
        assert lab.shape == (h, w) and lab.dtype == np.uint8 and lab.max() < 3  # one of the 3 classes
        with Image.open(out / f"{stem}_overlay.png") as ov:
            assert ov.size == (w, h) and ov.mode == "RGB"
    meta = json.loads((out / "classes.json").read_text())
    assert meta["classes"] == [["sky", "clouds"], ["person", "people", "astronaut"], ["rocket"]]
    assert meta["backbone"] == "tiny-clip-64" and len(meta["images"]) == 3
    assert "astronaut_overlay.png" in capsys.readouterr().out


def test_segment_sliding_and_classes_file(photo_files, tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("sky\ngrass,lawn\ncat\n")
    rc = main(["segment", str(photo_files[2]), "--classes-file", str(f), "--backbone", "tiny-clip-64",
               "--short-side", "96", "--mode", "sliding", "--stride", "24", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 0
    lab = np.asarray(Image.open(tmp_path / "o" / "astronaut_labels.png"))
    assert lab.shape == load_photo("chelsea").shape[:2] and lab.max() < 3


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--classes", " ; "], "class list is empty"),
        (["--classes", "sky;road;Sky"], "duplicate class name 'Sky'"),
        (["--classes", "sky,,road"], "empty name"),
        ([], "class list is empty"),
        (["--classes", "sky", "--classes-file", "x.txt"], "not both"),
        (["--classes-file", "/nonexistent/c.txt"], "class-name file not found"),
    ],
)
def test_segment_bad_class_lists(photo_files, tmp_path, capsys, args, msg):
    rc = main(["segment", str(photo_files[0]), *args, "--backbone", "tiny-clip-64", "--out", str(tmp_path)])
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_segment_bad_images_and_models(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not an image")
    for argv, msg in [
        ([str(tmp_path / "none.png"), "--backbone", "tiny-clip-64"], "image not found"),
        ([str(bad), "--backbone", "tiny-clip-64"], "cannot read image"),
    ]:
        rc = main(["segment", *argv, "--classes", "a;b", "--out", str(tmp_path / "o")])
        assert rc == 2 and msg in capsys.readouterr().err
    photo = tmp_path / "p.png"
    Image.fromarray(load_photo("rocket")).save(photo)
    rc = main(["segment", str(photo), "--classes", "a;b", "--out", str(tmp_path / "o")])
    assert rc == 2 and "give exactly one of --checkpoint" in capsys.readouterr().err
    rc = main(["segment", str(photo), "--classes", "a;b", "--checkpoint", str(tmp_path / "nockpt"),
               "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "checkpoint directory not found" in capsys.readouterr().err


def test_embed_writes_features_and_metadata(photo_files, tmp_path):
    from spar_core.backbones import build_backbone

    out = tmp_path / "emb"
    recs = embed_images(
        [str(photo_files[1])], EmbedConfig(backbone="tiny-clip-64", out=str(out), long_side=160)
    )
    img = np.asarray(Image.open(photo_files[1]).convert("RGB"))  # coffee: 400 x 600
    size = protocol_size(*img.shape[:2], 0, 160, 16)
    assert size == (107, 160)  # mmcv rescale: int(400 * 160/600 + 0.5); the model reads the top 96 rows
    arr = np.load(out / "my_photo__1_.npy", allow_pickle=False)
    meta = json.loads((out / "my_photo__1_.json").read_text())
    assert arr.shape == (6, 10, 32) and arr.dtype == np.float32
    assert (
        meta["shape"] == [6, 10, 32]
        and meta["input_size"] == [400, 600]
        and meta["resized_size"] == [107, 160]
        and meta["processed_size"] == [96, 160]
    )
    assert meta["weights_id"] == "random:tiny-clip-64:seed0" and recs[0]["features"] == "my_photo__1_.npy"
    # the stored features are the backbone's dense features of the resized image
    bb = build_backbone("tiny-clip-64")
    x = cv2_fixed(img, 107, 160)[:96]  # cv2 INTER_LINEAR (no antialias), then the patch embedding's crop
    with torch.no_grad():
        ref = bb.dense(bb.normalize(torch.from_numpy(x.copy())[None]))[0].numpy()
    np.testing.assert_allclose(arr, ref, rtol=1e-5, atol=1e-5)
    rc = main(["embed", str(photo_files[0]), "--backbone", "tiny-clip-64", "--short-side", "64", "--dtype",
               "float16", "--out", str(out)])  # fmt: skip
    assert rc == 0 and np.load(out / "astronaut.npy").shape == (4, 4, 32)


def test_names_cannot_escape_out(tmp_path):
    used: set[str] = set()
    assert safe_stem("../../etc/passwd", used) == "passwd"
    assert safe_stem("..\\..\\x.png", used) == "x"
    assert safe_stem(".hidden.png", used) == "hidden"
    assert safe_stem("...", used) == "image"
    assert safe_stem("a/b/x.png", used) == "x-1"
    with pytest.raises(InferenceError, match="outside"):
        out_path(tmp_path, "../x.png")
    assert out_path(tmp_path, "x.png").parent == tmp_path.resolve()


def test_protocol_size_and_label_png():
    assert protocol_size(375, 500, 672, 2048, 16) == (672, 896)  # 500 * 672/375 = 896
    assert protocol_size(1024, 2048, 1024, 2048, 16) == (1024, 2048)
    assert protocol_size(100, 5000, 672, 2048, 16) == (41, 2048)  # the long-side cap wins; mmcv rounding
    assert protocol_size(30, 40, 0, 2048, 16) == (30, 40)  # keep the scale (the model reads 16 x 32)
    assert protocol_size(10, 40, 0, 2048, 16) == (16, 40)  # at least one patch
    lab = np.array([[0, 1], [2, 300]])
    im = label_png(lab, make_palette(301))
    assert im.mode == "I;16" and np.asarray(im).tolist() == [[0, 1], [2, 300]]
