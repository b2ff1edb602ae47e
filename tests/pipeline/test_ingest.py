"""Ingest: real image files in, real webdataset tars out, read back with webdataset and the ImageSet reader."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
import webdataset as wds
from PIL import Image

from pipeline.cli import resolve_handler
from pipeline.data.augment import augmentation_for, to_rgb
from pipeline.data.cli import add_cli
from pipeline.data.config import IngestConfig, IngestError
from pipeline.data.imageset import ImageSetError, open_imageset
from pipeline.data.ingest import ingest
from pipeline.data.sources import assign_keys, sanitize_key
from tests.cv2_reference import cv2_linear

SKIMAGE_DIR = Path(skimage.data.__file__).parent
# small targets keep the tests fast: short sides in [64, 128], long sides <= 256
SMALL = dict(target_long=256, target_short=128, min_short=64)


def small_cfg(**kw) -> IngestConfig:
    return IngestConfig(**{**SMALL, "shard_size": 4, **kw})


def sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.uint8).tobytes()).hexdigest()


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


@pytest.fixture(autouse=True)
def _ray(ray_up):
    """Every test here may start shard tasks: use the session's local Ray cluster (2 CPUs)."""
    return ray_up


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory) -> Path:
    """scikit-image's bundled photos written as PNG and JPEG (RGB and grayscale), in sub-folders."""
    d = tmp_path_factory.mktemp("photos")
    (d / "rgb").mkdir()
    (d / "gray").mkdir()
    Image.fromarray(skimage.data.astronaut()).save(d / "rgb" / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()).save(d / "rgb" / "chelsea.jpg", quality=90)
    Image.fromarray(skimage.data.coffee()).save(d / "rgb" / "coffee.jpeg", quality=90)
    Image.fromarray(skimage.data.rocket()).save(d / "rgb" / "rocket.webp", lossless=True)
    Image.fromarray(skimage.data.camera()).save(d / "gray" / "camera.png")
    Image.fromarray(skimage.data.coins()).save(d / "gray" / "coins.bmp")
    Image.fromarray(skimage.data.moon()).save(d / "gray" / "moon.tif")
    (d / "notes.txt").write_text("not an image and not listed: ignored by folder scan")
    return d


# ------------------------------------------------------------------------------------------------ augmentation


def _check_params(h: int, w: int, cfg: IngestConfig, p: dict) -> None:
    rh, rw = p["resize"]
    top, left, ch, cw = p["crop"]
    m = cfg.multiple
    assert ch % m == 0 and cw % m == 0 and ch > 0 and cw > 0
    assert 0 <= top and top + ch <= rh and 0 <= left and left + cw <= rw
    assert min(ch, cw) >= cfg.min_short
    assert cfg.scale_min <= p["t"] <= cfg.scale_max
    t = p["t"]
    # resize to fit (target_long*t, target_short*t), reference formula written out independently
    fit = min(cfg.target_long * t / max(h, w), cfg.target_short * t / min(h, w))
    if cfg.max_side:
        fit = min(fit, cfg.max_side / max(h, w))
    if min(h * fit, w * fit) >= cfg.min_short + 1:
        assert p["mode"] in ("full", "crop")
        assert abs(rh - h * fit) <= 1.0 and abs(rw - w * fit) <= 1.0
        assert max(rh, rw) <= cfg.target_long * t + 1 and min(rh, rw) <= cfg.target_short * t + 1
        assert not cfg.max_side or max(rh, rw) <= cfg.max_side
    elif min(h * fit, w * fit) < cfg.min_short - 1:
        assert p["mode"] == "upscale"
        assert min(rh, rw) == cfg.min_short  # short side raised exactly to the floor
        assert abs(max(rh, rw) - max(h, w) * cfg.min_short / min(h, w)) <= 1.0
    if p["mode"] == "full":
        assert rh - ch < m and rw - cw < m  # only the snap removed pixels
    if p["mode"] == "crop":
        for L, c in ((rh, ch), (rw, cw)):
            assert c <= L
            assert c >= min(L, max(cfg.min_short, int(cfg.crop_min_frac * L))) - (m - 1)
    assert max(ch, cw) <= max(cfg.target_long, cfg.min_short)


@pytest.mark.parametrize("cfg", [IngestConfig(), IngestConfig(**SMALL), IngestConfig(max_side=1024)])
def test_augmentation_bounds_over_many_seeds(cfg):
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (4000, 3000), (300, 200), (17, 4000), (1500, 2250), (1024, 2048), (64, 64)]
    sizes += [tuple(int(x) for x in rng.integers(16, 5000, 2)) for _ in range(40)]
    modes, flips = [], []
    for seed in range(30):
        for j, (h, w) in enumerate(sizes):
            c = IngestConfig(**{**vars(cfg), "seed": seed})
            p = augmentation_for(f"img{j}", h, w, c)
            _check_params(h, w, c, p)
            if cfg.max_side:
                assert max(p["crop"][2:]) <= cfg.max_side
            modes.append(p["mode"])
            flips.append(p["flip"])
    n_big = sum(m in ("full", "crop") for m in modes)
    assert n_big > 200
    assert abs(sum(m == "crop" for m in modes) / n_big - 0.5) < 0.08  # crop with prob 0.5
    assert abs(np.mean(flips) - 0.5) < 0.05  # flip with prob 0.5


def test_augmentation_depends_only_on_seed_and_key():
    cfg = IngestConfig()
    a = [augmentation_for(f"k{i}", 1500, 2250, cfg) for i in range(20)]
    b = [augmentation_for(f"k{i}", 1500, 2250, cfg) for i in reversed(range(20))][::-1]
    assert a == b
    other = [augmentation_for(f"k{i}", 1500, 2250, IngestConfig(seed=1)) for i in range(20)]
    assert a != other


def test_no_augment_is_plain_snap():
    cfg = IngestConfig(augment=False)
    p = augmentation_for("x", 517, 333, cfg)
    assert p["mode"] == "plain" and not p["flip"] and p["resize"] == [517, 333]
    assert p["crop"][2:] == [512, 320]
    p = augmentation_for("x", 4000, 1000, IngestConfig(augment=False, max_side=1024))
    assert p["resize"] == [1024, 256] and p["crop"][2:] == [1024, 256]


def test_config_validation_names_the_field():
    with pytest.raises(Exception, match="min_short"):
        IngestConfig(min_short=100)  # not a multiple of 16
    with pytest.raises(Exception, match="shard_size"):
        IngestConfig(shard_size=0)


# ------------------------------------------------------------------------------------------------ keys


def test_keys_are_sanitised_and_unique():
    rels = ["a/b.png", "a_b.jpg", "a_b.png", "../../etc/passwd.png", "x/../../y.JPG", "..png", "a b.c.d.png",
            "é/日本.png", "-.png", "a/b.png.jpg"]  # fmt: skip
    keys = assign_keys(rels)
    assert len(set(keys)) == len(keys)
    for k in keys:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", k), k
        assert ".." not in k and "/" not in k and "." not in k
    assert keys[:3] == ["a_b", "a_b-2", "a_b-3"]
    assert keys[3] == "etc_passwd"
    assert sanitize_key("x" * 500 + ".png") != sanitize_key("x" * 501 + ".png")
    assert len(sanitize_key("x" * 500 + ".png")) <= 96


def test_path_traversal_cannot_escape_root(tmp_path):
    outside = tmp_path / "outside"
    lists = tmp_path / "lists" / "deep"
    outside.mkdir()
    lists.mkdir(parents=True)
    img = Image.fromarray(skimage.data.astronaut()[::4, ::4])
    img.save(outside / "evil.png")
    img.save(outside / "..png", format="PNG")
    img.save(outside / "..%2f..%2fescape.png")
    (lists / "list.txt").write_text(
        "../../outside/evil.png\n"
        f"{outside}/..png\n"
        "../../outside/..%2f..%2fescape.png\n"
        "# a comment\n\n"
        "../../outside/../outside/evil.png\n"
    )
    root = tmp_path / "root"
    before = {p for p in tmp_path.rglob("*")}
    s = ingest(str(lists / "list.txt"), str(root), small_cfg(), workers=1, progress=False)
    assert s.num_inputs == 3  # the last line is the same file as the first after normalisation
    assert s.accepted == 3, s.line()
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(root in p.parents or p == root for p in new), sorted(new)
    ims = open_imageset(str(root))
    for i in range(ims.num_shards):
        with tarfile.open(ims.shard_url(i)) as tf:
            for m in tf.getmembers():
                assert "/" not in m.name and not m.name.startswith(".") and ".." not in m.name
                assert re.fullmatch(r"[A-Za-z0-9_-]+\.(png|json)", m.name)


# ------------------------------------------------------------------------------------------------ image modes


def test_image_modes_are_converted_correctly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    rgb = skimage.data.astronaut()[:128, :160]  # (128, 160, 3), multiples of 16: plain mode keeps every pixel
    gray = skimage.data.camera()[:96, :128]
    Image.fromarray(gray).save(src / "gray.png")
    # RGBA with a ramp of alpha, composited on the configured background
    alpha = np.tile(np.linspace(0, 255, 160).astype(np.uint8), (128, 1))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(src / "rgba.png")
    # palette with transparency for index 0
    idx = rng.integers(0, 4, (64, 64)).astype(np.uint8)
    pal = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]
    p_img = Image.fromarray(idx, "P")
    p_img.putpalette(pal)
    p_img.save(src / "palette.png", transparency=0)
    # 16-bit grayscale: v16 = v8 * 257 must come back as v8
    Image.fromarray(gray.astype(np.uint16) * 257).save(src / "gray16.png")
    # EXIF orientation 6 (rotate 90° clockwise for display)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(src / "rotated.jpg", exif=exif.tobytes(), quality=95)
    # CMYK TIFF with K = 0: R = 255 - C exactly
    cmy = rgb.copy()
    Image.fromarray(np.dstack([255 - cmy, np.zeros((128, 160), np.uint8)]), "CMYK").save(src / "cmyk.tif")

    cfg = IngestConfig(augment=False, background=(10, 20, 30), shard_size=10)
    s = ingest(str(src), str(tmp_path / "out"), cfg, workers=1, progress=False)
    assert (s.accepted, s.rejected) == (6, 0), s.line()
    ims = open_imageset(str(tmp_path / "out"))
    got = {r.key: arr for i in range(ims.num_shards) for r, arr in ims.iter_shard(i)}

    np.testing.assert_array_equal(got["gray"], np.stack([gray] * 3, -1))
    np.testing.assert_array_equal(got["gray16"], np.stack([gray] * 3, -1))
    a = alpha[..., None].astype(np.float64) / 255
    expect = rgb * a + np.array([10, 20, 30]) * (1 - a)
    assert np.abs(got["rgba"].astype(np.float64) - expect).max() <= 1.0
    ref_pal = np.array(pal, np.uint8).reshape(4, 3)
    ref_pal[0] = [10, 20, 30]  # index 0 is transparent: the background shows
    np.testing.assert_array_equal(got["palette"], ref_pal[idx])
    assert got["rotated"].shape == (160, 128, 3)  # width and height swapped
    rot = np.rot90(rgb, k=-1)  # clockwise
    assert np.abs(got["rotated"].astype(int) - rot).mean() < 4  # JPEG-lossy
    np.testing.assert_array_equal(got["cmyk"], rgb)


def test_to_rgb_modes_by_hand():
    bg = (10, 20, 30)
    one = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    np.testing.assert_array_equal(np.asarray(to_rgb(one, bg)), [[[0, 0, 0], [255, 255, 255]]])
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], np.uint8), "LA")
    np.testing.assert_array_equal(np.asarray(to_rgb(la, bg)), [[[200, 200, 200], [10, 20, 30]]])
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    np.testing.assert_array_equal(np.asarray(to_rgb(f, bg))[..., 0], [[0, 128, 255]])
    i16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
    np.testing.assert_array_equal(np.asarray(to_rgb(i16, bg))[..., 1], [[0, 100, 255]])


# ------------------------------------------------------------------------------------------------ bad inputs


def _make_mixed(d: Path) -> dict[str, str]:
    """Write good and bad files; return {file name: expected reason prefix or 'ok'}."""
    d.mkdir()
    expect = {}
    Image.fromarray(skimage.data.astronaut()).save(d / "astronaut.png")
    Image.fromarray(skimage.data.camera()).save(d / "camera.jpg", quality=90)
    Image.fromarray(skimage.data.logo()).save(d / "logo.png")  # RGBA
    Image.fromarray(skimage.data.coins()[:40, :50]).save(d / "small.png")  # tiny: upscaled to the floor
    expect.update({"astronaut.png": "ok", "camera.jpg": "ok", "logo.png": "ok", "small.png": "ok"})
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, format="JPEG", quality=90)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "fake.jpg").write_text("<html>this is not a jpeg</html>")
    Image.new("1", (4000, 3000)).save(d / "bomb.png")  # 12 Mpx, a few kB on disk
    Image.fromarray(skimage.data.camera()).save(d / "really_a_gif.png", format="GIF")
    Image.new("RGB", (4000, 2), (9, 9, 9)).save(d / "sliver.png")  # floor 64 -> 64x128000 > max_pixels
    expect["sliver.png"] = "extreme_aspect"
    expect.update({"truncated.jpg": "corrupt", "empty.png": "empty_file", "fake.jpg": "not_an_image",
                   "bomb.png": "decompression_bomb", "really_a_gif.png": "unsupported_format"})  # fmt: skip
    return expect


def test_mixed_set_counts_and_reasons(tmp_path):
    expect = _make_mixed(tmp_path / "mixed")
    cfg = small_cfg(
        max_pixels=5_000_000, shard_size=1
    )  # one input a shard: rejected inputs leave empty shards
    s = ingest(str(tmp_path / "mixed"), str(tmp_path / "out"), cfg, workers=2, progress=False)
    n_ok = sum(v == "ok" for v in expect.values())
    assert s.num_inputs == len(expect) == s.accepted + s.rejected
    assert (s.accepted, s.rejected) == (n_ok, len(expect) - n_ok), s.line()
    assert s.rejected_reasons == {"corrupt": 1, "empty_file": 1, "not_an_image": 1, "decompression_bomb": 1,
                                  "unsupported_format": 1, "extreme_aspect": 1}  # fmt: skip
    assert "6 rejected" in s.line()
    table = pq.read_table(tmp_path / "out" / "images" / "rejected.parquet").to_pylist()
    got = {Path(r["source"]).name: r["reason"].split(":", 1)[0] for r in table}
    assert got == {k: v for k, v in expect.items() if v != "ok"}
    ims = open_imageset(str(tmp_path / "out"))
    assert {Path(r.source).name for r in ims.records} == {k for k, v in expect.items() if v == "ok"}
    assert ims.counts == {"inputs": 10, "accepted": 4, "rejected": 6, "shards": 10}
    empty = [i for i in range(ims.num_shards) if not ims.shard_records(i)]
    assert len(empty) == 6 and all(list(ims.iter_shard(i)) == [] for i in empty)
    urls = [ims.shard_url(i) for i in range(ims.num_shards)]
    keys = [x["__key__"] for x in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert keys == [r.key for r in ims.records]
    assert sorted(ims.rejected()) == sorted((r["source"], r["reason"]) for r in table)


def test_bad_source_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        ingest(str(tmp_path / "nope"), str(tmp_path / "out"), small_cfg(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="holds no images"):
        ingest(str(tmp_path / "empty"), str(tmp_path / "out"), small_cfg(), progress=False)
    with pytest.raises(ImageSetError, match="not an image set"):
        open_imageset(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------ determinism, read-back


def _tree_content(root: Path) -> dict[str, object]:
    """Every file under ``root`` by what it holds: a shard tar as its members (a PNG by its decoded pixels), a shard
    sidecar without its tar hash and size (after checking them against its own tar), any other file as bytes.

    Not the tars' bytes: in one default test run, two worker processes of the session's Ray cluster wrote the same
    pixels as PNGs one deflate byte apart (ISA-L level 1; both streams valid and equal once inflated; not
    reproduced in a fresh process, cause not found), so equal content is what a rerun or a resume promises."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        name = str(p.relative_to(root))
        if p.suffix == ".tar":
            with tarfile.open(p) as tf:
                out[name] = [
                    (m.name, _member_content(m.name, tf.extractfile(m).read())) for m in tf.getmembers()
                ]
        elif re.fullmatch(r"shard-\d+\.json", p.name):
            side = json.loads(p.read_text())
            tar = p.with_suffix(".tar")
            assert side.pop("tar_sha256") == hashlib.sha256(tar.read_bytes()).hexdigest(), f"{p} vs its tar"
            assert side.pop("tar_bytes") == tar.stat().st_size, f"{p} vs its tar"
            out[name] = side
        else:
            out[name] = p.read_bytes()
    return out


def _member_content(name: str, data: bytes) -> object:
    if name.endswith(".png"):
        return hashlib.sha256(np.asarray(Image.open(io.BytesIO(data))).tobytes()).hexdigest()
    return data


def test_determinism_identical_content_and_fingerprint(photo_tree, tmp_path):
    cfg = small_cfg(seed=7, shard_size=3)
    s1 = ingest(str(photo_tree), str(tmp_path / "a"), cfg, workers=2, progress=False)
    s2 = ingest(str(photo_tree), str(tmp_path / "b"), cfg, workers=1, progress=False)
    assert s1.fingerprint == s2.fingerprint
    assert s1.accepted == 7 and s1.num_shards == 3
    a, b = _tree_content(tmp_path / "a"), _tree_content(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    s3 = ingest(
        str(photo_tree), str(tmp_path / "c"), small_cfg(seed=8, shard_size=3), workers=2, progress=False
    )
    assert s3.fingerprint != s1.fingerprint
    with tarfile.open(tmp_path / "a" / "images" / "shard-000000.tar") as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")


def test_webdataset_reads_back_manifest_keys_and_hashes(photo_tree, tmp_path):
    ingest(str(photo_tree), str(tmp_path / "r"), small_cfg(shard_size=3), workers=2, progress=False)
    ims = open_imageset(str(tmp_path / "r"))
    manifest = pq.read_table(tmp_path / "r" / "images" / "manifest.parquet").to_pylist()
    assert [m["key"] for m in manifest] == [r.key for r in ims.records]
    urls = [ims.shard_url(i) for i in range(ims.num_shards)]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        arr = decode(sample["png"])
        meta = json.loads(sample["json"])
        seen.append((sample["__key__"], sha(arr), arr.shape[:2]))
        assert meta["pixel_sha256"] == sha(arr) and meta["key"] == sample["__key__"]
        assert arr.shape[0] % 16 == 0 and arr.shape[1] % 16 == 0 and min(arr.shape[:2]) >= 64
    assert seen == [(m["key"], m["pixel_sha256"], (m["height"], m["width"])) for m in manifest]
    # the reader agrees with webdataset, shard by shard and by key
    for i in range(ims.num_shards):
        for rec, arr in ims.iter_shard(i):
            assert sha(arr) == rec.pixel_sha256 and rec.shard == i
    k = ims.records[-1].key
    assert sha(ims.read(k)) == ims.record(k).pixel_sha256
    # an independent reference for one image: decode the source, apply the recorded parameters with numpy
    rec = ims.record("rgb_astronaut")
    src = np.asarray(Image.open(rec.source).convert("RGB"))
    p = rec.augmentation
    rh, rw = p["resize"]
    top, left, ch, cw = p["crop"]
    ref = cv2_linear(src, rh, rw)[top : top + ch, left : left + cw]  # the reference's cv2 INTER_LINEAR
    ref = ref[:, ::-1] if p["flip"] else ref
    got = ims.read("rgb_astronaut")
    assert got.shape == ref.shape and p["resize"] != [512, 512]  # a real resize happened
    diff = np.abs(got.astype(int) - ref.astype(int))  # fixed point vs exact weights: 1 grey level
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_reader_detects_corruption(photo_tree, tmp_path):
    ingest(str(photo_tree), str(tmp_path / "r"), small_cfg(shard_size=10), workers=1, progress=False)
    images = tmp_path / "r" / "images"
    tar = images / "shard-000000.tar"
    # replace one image's pixels inside the tar (valid PNG, wrong content)
    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(tar, "w") as tf:
        for m, data in members:
            if m.name.endswith(".png") and m.name.startswith("gray_camera"):
                arr = decode(data).copy()
                arr[0, 0] ^= 0xFF
                data = io.BytesIO()
                Image.fromarray(arr).save(data, format="PNG")
                data = data.getvalue()
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    ims = open_imageset(str(tmp_path / "r"))
    with pytest.raises(ImageSetError, match="gray_camera"):
        list(ims.iter_shard(0))
    with pytest.raises(ImageSetError, match="gray_camera"):
        ims.read("gray_camera")
    assert [r.key for r, _ in ims.iter_shard(0, verify=False)] == [r.key for r in ims.records]
    assert ims.verify() == []  # sizes and hashes listed in the sidecars still agree with the manifest...
    assert len(ims.verify(deep=True)) == 1  # ...but the tar bytes are not the ones ingest wrote
    (images / "shard-000000.tar").unlink()
    assert "missing" in ims.verify()[0]
    with pytest.raises(ImageSetError, match="missing"):
        ims.read("gray_camera")
    # a tampered manifest no longer matches the fingerprint
    meta = json.loads((images / "imageset.json").read_text())
    meta["fingerprint"] = "0" * 64
    (images / "imageset.json").write_text(json.dumps(meta))
    with pytest.raises(ImageSetError, match="fingerprint"):
        open_imageset(str(images))


# ------------------------------------------------------------------------------------------------ resume


def test_interrupted_ingest_resumes_only_missing_shards(photo_tree, tmp_path):
    cfg = small_cfg(shard_size=2)  # 7 photos -> 4 shards
    out = tmp_path / "out"
    s1 = ingest(str(photo_tree), str(out), cfg, workers=2, progress=False)
    assert s1.num_shards == 4
    images = out / "images"
    reference = _tree_content(out)
    # simulate an interruption: shard 1 never finished (only its .tmp is there), shard 3 was half-written
    (images / "shard-000001.tar").rename(images / "shard-000001.tar.tmp")
    (images / "shard-000001.tar.tmp").write_bytes(b"partial")
    data = (images / "shard-000003.tar").read_bytes()
    (images / "shard-000003.tar").write_bytes(data[: len(data) // 2])
    # shard 2's sidecar lost a record (its tar is intact): it no longer accounts for its inputs -> redone
    side = json.loads((images / "shard-000002.json").read_text())
    side["records"] = side["records"][1:]
    (images / "shard-000002.json").write_text(json.dumps(side))
    (images / "imageset.json").unlink()
    with pytest.raises(ImageSetError):
        open_imageset(str(out))  # incomplete sets are not readable
    mtimes = {i: (images / f"shard-{i:06d}.tar").stat().st_mtime_ns for i in (0,)}

    s2 = ingest(str(photo_tree), str(out), cfg, workers=2, progress=False)
    assert (s2.shards_written, s2.shards_skipped) == (3, 1)
    assert s2.fingerprint == s1.fingerprint
    for i in (0,):
        assert (images / f"shard-{i:06d}.tar").stat().st_mtime_ns == mtimes[i]
    assert not list(images.glob("*.tmp"))
    assert _tree_content(out) == reference

    # a run with another config rewrites every shard and drops shards the new plan no longer has
    s3 = ingest(str(photo_tree), str(out), small_cfg(shard_size=3, seed=1), workers=2, progress=False)
    assert (s3.shards_written, s3.num_shards) == (3, 3)
    assert not (images / "shard-000003.tar").exists()
    assert open_imageset(str(out)).fingerprint == s3.fingerprint


# ------------------------------------------------------------------------------------------------ URLs and CLI


def test_fsspec_url_sources_and_list_file(photo_tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted(photo_tree.rglob("*.png"))))
    s = ingest(f"file://{lst}", f"file://{tmp_path / 'out'}", small_cfg(), workers=1, progress=False)
    assert s.accepted == 2
    ims = open_imageset(f"file://{tmp_path / 'out'}")
    assert all(r.source.startswith("file://") for r in ims.records)
    g = ingest(str(photo_tree / "*" / "*.png"), str(tmp_path / "g"), small_cfg(), workers=1, progress=False)
    assert g.accepted == 2
    assert [r.key for r in open_imageset(str(tmp_path / "g")).records] == ["gray_camera", "rgb_astronaut"]


def test_cli(photo_tree, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="spar")
    add_cli(parser.add_subparsers())
    args = parser.parse_args(
        [
            "ingest", str(photo_tree / "gray"), "--out", str(tmp_path / "cli"), "--seed", "3", "--shard-size", "2",
            "--no-augment", "--max-side", "256", "--workers", "1", "--quiet",
        ]
    )  # fmt: skip
    assert resolve_handler(args)(args) == 0
    line = capsys.readouterr().out
    assert "3 inputs -> 3 accepted, 0 rejected" in line
    ims = open_imageset(str(tmp_path / "cli"))
    assert ims.num_shards == 2 and ims.config["seed"] == 3 and ims.config["augment"] is False
    assert all(max(r.height, r.width) <= 256 for r in ims.records)


def test_empty_output_dir_is_left_clean_of_tmp(photo_tree, tmp_path):
    out = tmp_path / "o"
    ingest(str(photo_tree / "rgb"), str(out), small_cfg(), workers=1, progress=False)
    names = sorted(os.listdir(out / "images"))
    assert names == ["imageset.json", "manifest.parquet", "rejected.parquet", "shard-000000.json",
                     "shard-000000.tar"]  # fmt: skip
    shutil.rmtree(out)


def test_spar_cli_recipe_and_user_errors(photo_tree, tmp_path, capsys):
    from pipeline.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        "[ingest]\nseed = 5\nshard_size = 2\ntarget_long = 256\ntarget_short = 128\nmin_short = 64\n"
    )
    out = tmp_path / "o"
    rc = main(["ingest", str(photo_tree / "rgb"), "--out", str(out), "--config", str(recipe),
               "--set", "flip_prob=0", "--shard-size", "3", "--quiet"])  # fmt: skip
    assert rc == 0
    ims = open_imageset(str(out))
    assert (ims.config["seed"], ims.config["shard_size"], ims.config["flip_prob"]) == (5, 3, 0.0)
    assert not any(r.augmentation["flip"] for r in ims.records)
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["ingest", str(photo_tree), "--out", str(out), "--set", "min_short=100"]) == 2
    assert "min_short" in capsys.readouterr().err
    assert main(["ingest", str(photo_tree), "--out", str(out), "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_bench_ingest_runs_and_output_is_worker_count_independent(tmp_path):
    from pipeline.bench import ingest as bench_ingest
    from pipeline.cli import build_parser
    from pipeline.common.photos import sample_photo_files

    args = build_parser("bench").parse_args(
        [
            "bench",
            "ingest",
            "--copies",
            "1",
            "--recipe",
            "small",
            "--workers",
            "1,2",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    assert bench_ingest.run(args) == 0
    info = json.loads((tmp_path / "b.json").read_text())
    assert info["same_fingerprint_across_worker_counts"] is True
    assert [r["workers"] for r in info["results"]] == [1, 2]
    n = len(sample_photo_files())
    assert all(r["inputs"] == n == r["accepted"] + r["rejected"] for r in info["results"])


KILL_SCRIPT = """
import sys
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
ingest(sys.argv[1], sys.argv[2], IngestConfig(shard_size=1), workers=1, progress=False)
"""


@pytest.mark.slow
@pytest.mark.ci
def test_killed_ingest_resumes(tmp_path):
    """SIGKILL a real ingest (driver, its local Ray cluster and workers) mid-run, then resume."""
    import signal
    import subprocess
    import sys
    import time

    from pipeline.common.photos import sample_photo_files

    src = tmp_path / "src"
    src.mkdir()
    for p in sample_photo_files():
        shutil.copyfile(p, src / p.name)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(src), str(out)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    images = out / "images"
    try:
        deadline = time.monotonic() + 300
        while (
            len(list(images.glob("shard-*.tar"))) < 3 and proc.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = sorted(images.glob("shard-*.tar"))
    total = len(sample_photo_files())
    if len(finished) >= total:
        pytest.skip("ingest finished before it could be killed")
    assert not (images / "imageset.json").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in finished}

    s = ingest(str(src), str(out), IngestConfig(shard_size=1), workers=2, progress=False)
    assert s.shards_skipped == len(finished) and s.shards_written == total - len(finished)
    assert all((images / name).stat().st_mtime_ns == t for name, t in mtimes.items())
    ref = ingest(str(src), str(tmp_path / "ref"), IngestConfig(shard_size=1), workers=2, progress=False)
    assert s.fingerprint == ref.fingerprint
    assert _tree_content(images) == _tree_content(tmp_path / "ref" / "images")


def test_s3_source_and_output_via_fsspec(photo_tree, tmp_path):
    """Sources listed and read through s3fs (moto server), shards written to s3 and read back from s3. Endpoint and
    credentials are in this process's environment only; the shard tasks get them through their runtime
    environment, as on a cluster."""
    from tests.builders import moto_s3

    with moto_s3("bkt") as (fs, _env):
        for p in sorted(p for p in photo_tree.rglob("*") if p.is_file()):
            fs.put_file(str(p), f"bkt/photos/{p.relative_to(photo_tree)}")
        s = ingest("s3://bkt/photos", "s3://bkt/set", small_cfg(shard_size=2), workers=2, progress=False)
        assert "7 inputs -> 7 accepted, 0 rejected" in s.line()
        ims = open_imageset("s3://bkt/set")
        assert ims.shard_url(0) == "s3://bkt/set/images/shard-000000.tar"
        assert all(r.source.startswith("s3://bkt/photos/") for r in ims.records)
        n = 0
        for i in range(ims.num_shards):
            for rec, arr in ims.iter_shard(i):
                assert sha(arr) == rec.pixel_sha256
                n += 1
        assert n == 7
        # the same photos ingested locally give the same pixels (source paths are provenance only)
        loc = ingest(
            str(photo_tree), str(tmp_path / "loc"), small_cfg(shard_size=2), workers=2, progress=False
        )
        assert loc.fingerprint == ims.fingerprint
        assert not fs.glob("bkt/set/images/*.tmp")


def test_failing_shard_task_is_a_clear_error_and_keeps_finished_shards(photo_tree, tmp_path):
    """A shard task that cannot publish its tar (a folder is in the way) fails; the others finish and are kept."""
    out = tmp_path / "out"
    images = out / "images"
    (images / "shard-000001.tar").mkdir(parents=True)
    (images / "shard-000001.tar" / "blocker").write_text("x")
    cfg = small_cfg(shard_size=2)
    with pytest.raises(IngestError, match=r"shard\(s\) \[1\] failed.*re-run to resume"):
        ingest(str(photo_tree), str(out), cfg, workers=1, progress=False)
    assert (images / "shard-000000.tar").is_file() and (images / "shard-000001.tar").is_dir()
    assert not (images / "imageset.json").exists()
    shutil.rmtree(images / "shard-000001.tar")
    s = ingest(str(photo_tree), str(out), cfg, workers=2, progress=False)
    assert s.shards_skipped >= 1 and s.accepted == 7
    assert not list(images.glob("*.tmp"))
    assert (
        s.fingerprint
        == ingest(str(photo_tree), str(tmp_path / "ref"), cfg, workers=2, progress=False).fingerprint
    )


def test_progress_bar_path(photo_tree, tmp_path, monkeypatch, capsys):
    """With a bar shown, per-image progress comes from a small Ray actor; output is unchanged."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    s = ingest(str(photo_tree), str(tmp_path / "p"), small_cfg(shard_size=3), workers=2, progress=True)
    assert "7/7" in capsys.readouterr().err
    ref = ingest(str(photo_tree), str(tmp_path / "q"), small_cfg(shard_size=3), workers=2, progress=False)
    assert s.fingerprint == ref.fingerprint
