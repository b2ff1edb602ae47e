"""Benchmark readers against tiny datasets written here in each real on-disk layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import (
    INFOS,
    ClassNamesError,
    DatasetError,
    default_classes,
    open_dataset,
    parse_class_text,
    read_class_file,
)


def voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (256 entries), as written in the dataset's PNGs."""
    pal = []
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def save_palette_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def save_gray_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def save_rgb(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(img).save(path)
    return img


def make_voc(root: Path, labels: dict[str, np.ndarray], year: str = "2012", context: bool = False) -> Path:
    """Write a VOC (or mmseg-prepared Context) layout under root/VOCdevkit/VOC<year>."""
    base = root / "VOCdevkit" / f"VOC{year}"
    lab_dir = "SegmentationClassContext" if context else "SegmentationClass"
    list_dir = "SegmentationContext" if context else "Segmentation"
    for i, (key, lab) in enumerate(labels.items()):
        save_rgb(base / "JPEGImages" / f"{key}.jpg", *lab.shape, seed=i)
        (save_gray_png if context else save_palette_png)(base / lab_dir / f"{key}.png", lab)
    (base / "ImageSets" / list_dir).mkdir(parents=True, exist_ok=True)
    (base / "ImageSets" / list_dir / "val.txt").write_text("\n".join(labels) + "\n")
    return base


def make_cityscapes(root: Path, labels: dict[tuple[str, str], np.ndarray]) -> Path:
    for i, ((city, stem), lab) in enumerate(labels.items()):
        save_rgb(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", *lab.shape, seed=i)
        save_gray_png(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", lab)
    return root


def make_ade(root: Path, labels: dict[str, np.ndarray]) -> Path:
    base = root / "ADEChallengeData2016"
    for i, (stem, lab) in enumerate(labels.items()):
        save_rgb(base / "images" / "validation" / f"{stem}.jpg", *lab.shape, seed=i)
        save_gray_png(base / "annotations" / "validation" / f"{stem}.png", lab)
    return base


LAB = np.array([[0, 0, 5, 5], [0, 255, 5, 20], [1, 1, 255, 20]], dtype=np.uint8)  # (3, 4)


def test_voc21_palette_labels_read_as_indices(tmp_path):
    make_voc(tmp_path, {"2007_000001": LAB, "2007_000002": LAB[::-1].copy()})
    ds = open_dataset("voc21", tmp_path)
    assert len(ds) == 2 and ds.num_classes == 21
    img, lab = ds.load(0)
    assert img.shape == (3, 4, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(lab, LAB)  # palette indices, not colours
    np.testing.assert_array_equal(ds.load_label(1), LAB[::-1])
    assert ds.out_of_range == {}
    # the dataset folder itself works as root too
    assert len(open_dataset("voc21", tmp_path / "VOCdevkit" / "VOC2012")) == 2


def test_voc20_removes_background_and_shifts(tmp_path):
    make_voc(tmp_path, {"a": LAB})
    lab = open_dataset("voc20", tmp_path).load_label(0)
    expected = np.array([[255, 255, 4, 4], [255, 255, 4, 19], [0, 0, 255, 19]], dtype=np.uint8)
    np.testing.assert_array_equal(lab, expected)


def test_context_60_and_59(tmp_path):
    raw = np.array([[0, 59, 12], [255, 1, 0]], dtype=np.uint8)
    make_voc(tmp_path, {"2008_000002": raw}, year="2010", context=True)
    np.testing.assert_array_equal(open_dataset("context60", tmp_path).load_label(0), raw)
    lab59 = open_dataset("context59", tmp_path).load_label(0)
    np.testing.assert_array_equal(lab59, np.array([[255, 58, 11], [255, 0, 255]], dtype=np.uint8))
    assert INFOS["context59"].num_classes == 59


def test_cityscapes_train_ids(tmp_path):
    lab = np.array([[0, 18, 255], [7, 7, 11]], dtype=np.uint8)
    make_cityscapes(
        tmp_path, {("frankfurt", "frankfurt_000000_000294"): lab, ("lindau", "lindau_000001_000019"): lab}
    )
    ds = open_dataset("cityscapes", tmp_path)
    assert [s.key for s in ds.samples] == ["frankfurt_000000_000294", "lindau_000001_000019"]
    np.testing.assert_array_equal(ds.load_label(0), lab)
    assert ds.load_image(1).shape == (2, 3, 3)


def test_ade20k_zero_ignored_and_shifted(tmp_path):
    raw = np.array([[0, 1, 150], [2, 0, 75]], dtype=np.uint8)
    make_ade(tmp_path, {"ADE_val_00000001": raw})
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        lab = open_dataset("ade20k", root).load_label(0)
        np.testing.assert_array_equal(lab, np.array([[255, 0, 149], [1, 255, 74]], dtype=np.uint8))


def test_out_of_range_labels_are_counted_not_fatal(tmp_path):
    raw = np.array([[0, 1, 151, 200], [150, 255, 151, 3]], dtype=np.uint8)
    make_ade(tmp_path, {"ADE_val_1": raw})
    ds = open_dataset("ade20k", tmp_path)
    lab = ds.load_label(0)
    np.testing.assert_array_equal(lab, np.array([[255, 0, 255, 255], [149, 255, 255, 2]], dtype=np.uint8))
    assert ds.out_of_range == {"ADE_val_1": 3}  # 151, 200, 151 -> 150, 199, 150 >= 150
    bad = LAB.copy()
    bad[0, 0] = 21
    make_voc(tmp_path / "v", {"x": bad})
    ds = open_dataset("voc21", tmp_path / "v")
    assert ds.load_label(0)[0, 0] == 255 and ds.out_of_range == {"x": 1}


def test_missing_folders_and_files_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        open_dataset("voc21", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="JPEGImages"):
        open_dataset("voc21", tmp_path)
    base = make_voc(tmp_path, {"a": LAB, "b": LAB})
    (base / "SegmentationClass" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"label file not found: .*b\.png"):
        open_dataset("voc21", tmp_path)
    (base / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DatasetError, match=r"split list not found: .*val\.txt"):
        open_dataset("voc21", tmp_path)
    ctx = make_voc(tmp_path / "c", {"a": LAB}, year="2010", context=True)
    shutil.rmtree(ctx / "SegmentationClassContext")
    with pytest.raises(DatasetError, match="SegmentationClassContext"):
        open_dataset("context59", tmp_path / "c")
    (tmp_path / "cs" / "leftImg8bit" / "val" / "aachen").mkdir(parents=True)
    (tmp_path / "cs" / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no .*_leftImg8bit.png"):
        open_dataset("cityscapes", tmp_path / "cs")
    save_rgb(tmp_path / "cs" / "leftImg8bit" / "val" / "aachen" / "aachen_1_leftImg8bit.png", 2, 2, 0)
    with pytest.raises(DatasetError, match="aachen_1_gtFine_labelTrainIds.png"):
        open_dataset("cityscapes", tmp_path / "cs")
    with pytest.raises(DatasetError, match="unknown dataset"):
        open_dataset("coco", tmp_path)


def test_bad_label_files(tmp_path):
    base = make_voc(tmp_path, {"a": LAB})
    Image.fromarray(np.zeros((3, 4, 3), np.uint8)).save(base / "SegmentationClass" / "a.png")
    with pytest.raises(DatasetError, match="colour image"):
        open_dataset("voc21", tmp_path).load(0)
    (base / "SegmentationClass" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read label .*a\.png"):
        open_dataset("voc21", tmp_path).load(0)
    save_palette_png(base / "SegmentationClass" / "a.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match="differs from image size"):
        open_dataset("voc21", tmp_path).load(0)


def test_packaged_class_files():
    for name, info in INFOS.items():
        classes = default_classes(name)
        assert len(classes) == info.num_classes, name
    voc21, voc20 = default_classes("voc21"), default_classes("voc20")
    assert voc21[1:] == voc20
    assert {"sky", "wall", "tree", "grass", "road", "building", "floor"} <= set(voc21[0])
    assert default_classes("context60")[1:] == default_classes("context59")
    assert default_classes("cityscapes")[0] == ["road"] and default_classes("ade20k")[0] == ["wall"]


def test_class_text_errors(tmp_path):
    assert parse_class_text("sky,clouds;road\nperson, people") == [
        ["sky", "clouds"],
        ["road"],
        ["person", "people"],
    ]
    with pytest.raises(ClassNamesError, match="empty"):
        parse_class_text(" ;\n ")
    with pytest.raises(ClassNamesError, match="duplicate"):
        parse_class_text("sky;road;Sky")
    with pytest.raises(ClassNamesError, match="duplicate"):
        parse_class_text("car,auto;truck,car")
    with pytest.raises(ClassNamesError, match="not found"):
        read_class_file(tmp_path / "none.txt")
    f = tmp_path / "c.txt"
    f.write_text("a,b\nc\n")
    assert read_class_file(f) == [["a", "b"], ["c"]]
