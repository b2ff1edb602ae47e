"""Inference helpers and the ``spar segment`` / ``spar embed`` commands.

Shared by evaluation: model loading (student checkpoint or named backbone), device and mixed-precision
selection, protocol resizing, dense features (single pass or sliding window), colour palettes and overlays,
sanitised output names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.common.config import ConfigError, apply_overrides, load_config
from pipeline.common.errors import UserError
from pipeline.data.datasets import ClassNamesError, parse_class_text, read_class_file
from pipeline.data.resize import resize_linear

Precision = Literal["fp32", "bf16", "fp16"]
TEACHER_STRIDE = 24  # px, the authors' slide_stride_gen for every backbone (configs/*/cfg_train_*.py)


class InferenceError(UserError):
    """Bad input to segment/embed (unreadable image, missing model, bad option)."""


# ---------------------------------------------------------------------------------------------- model & device


def pick_device(pref: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise the named device."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {pref!r} requested but CUDA is not available")
    return dev


def autocast_dtype(precision: str) -> torch.dtype | None:
    """Autocast dtype for a precision name (None for fp32); see :mod:`pipeline.common.precision`."""
    from pipeline.common.precision import autocast_dtype as _dtype

    return _dtype(precision)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """torch.autocast for bf16/fp16 on the device; a no-op for fp32 (:func:`pipeline.common.precision.autocast`)."""
    from pipeline.common.precision import autocast as _autocast

    with _autocast(device, precision):
        yield


def load_model(
    checkpoint: str = "",
    backbone: str = "",
    pretrained: str = "",
    device: torch.device | str = "cpu",
    seed: int = 0,
):
    """A Backbone from a student checkpoint directory or a named backbone (baseline/teacher).

    Exactly one of ``checkpoint`` and ``backbone`` must be given.
    """
    if bool(checkpoint) == bool(backbone):
        raise InferenceError("give exactly one of --checkpoint CKPT or --backbone NAME")
    if checkpoint:
        ckpt = Path(checkpoint).expanduser()
        if not ckpt.is_dir():
            raise InferenceError(f"checkpoint directory not found: {ckpt}")
        from pipeline.train.checkpoint import CheckpointError, load_student

        try:
            return load_student(str(ckpt), device=device)
        except CheckpointError as e:
            raise InferenceError(str(e)) from e
    from spar_core.backbones import BackboneError, build_backbone

    try:
        return build_backbone(backbone, pretrained or None, device=device, seed=seed)
    except (BackboneError, FileNotFoundError) as e:
        raise InferenceError(f"cannot build backbone {backbone!r}: {e}") from e


def model_identity(bb) -> dict[str, object]:
    """Identity of a backbone for logs and metadata."""
    return {
        "backbone": bb.name,
        "pretrained": bb.pretrained or "",
        "weights_id": bb.weights_id,
        "readout": bb.readout,
        "patch_size": bb.patch_size,
        "dim": bb.dim,
        "native_size": bb.native_size,
    }


# ---------------------------------------------------------------------------------------------- images


def read_photo(path: str | Path) -> np.ndarray:
    """Read a photo as (H, W, 3) uint8 RGB, honouring EXIF orientation; clear error when unreadable."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InferenceError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise InferenceError(f"cannot read image {p}: {e}") from e


def protocol_size(h: int, w: int, short_side: int, long_side: int, multiple: int = 1) -> tuple[int, int]:
    """Size after mmseg's ``Resize(scale=(long_side, short_side), keep_ratio=True)`` (mmcv ``rescale_size``):
    scale ``s = min(long_side / max(h, w), short_side / min(h, w))``, each side ``int(side * s + 0.5)``.

    ``short_side=0`` keeps the scale (only the long-side cap applies, never upscaling); ``long_side=0`` means no
    cap. A side below ``multiple`` is raised to it (at least one patch). The model then sees the top-left
    ``floor(side / patch) * patch`` pixels (:func:`patch_crop`), as the reference's strided patch embedding does.
    """
    scales = []
    if short_side > 0:
        scales.append(short_side / min(h, w))
    if long_side > 0:
        scales.append(long_side / max(h, w))
    s = min(scales) if scales else 1.0
    if short_side <= 0:
        s = min(s, 1.0)
    return max(multiple, int(h * s + 0.5)), max(multiple, int(w * s + 0.5))


def patch_crop(img: np.ndarray, patch: int) -> np.ndarray:
    """The top-left ``floor(H/p)·p × floor(W/p)·p`` pixels of (H, W, ...): what a stride-p patch embedding reads
    (the reference feeds un-snapped images to its conv; the remainder on the right/bottom is dropped)."""
    h, w = img.shape[0] // patch * patch, img.shape[1] // patch * patch
    if h == 0 or w == 0:
        raise InferenceError(f"image {img.shape[0]}x{img.shape[1]} is smaller than one {patch}-px patch")
    return img[:h, :w]


def model_input(
    img: np.ndarray, short_side: int, long_side: int, patch: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """The protocol's model input of an (H, W, 3) uint8 photo: resized as mmseg's keep-ratio ``Resize``
    (bilinear, no antialias: :func:`resize_rgb`), then :func:`patch_crop`. Returns (pixels, resized size)."""
    size = protocol_size(img.shape[0], img.shape[1], short_side, long_side, patch)
    return patch_crop(resize_rgb(img, size), patch), size


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H, W, 3) uint8 to ``size`` = (h, w) as the reference's cv2 ``INTER_LINEAR``: bilinear with
    half-pixel centres, no antialiasing when shrinking (:func:`pipeline.data.resize.resize_linear`)."""
    return resize_linear(img, size)


def default_stride(crop: int) -> int:
    """The paper's teacher stride: 24 px at every crop (CLIP 224, SigLIP2 512, DINOv3 384); at most the crop."""
    return min(TEACHER_STRIDE, crop) if crop > 0 else TEACHER_STRIDE


@torch.no_grad()
def dense_features(
    bb,
    img: np.ndarray,
    mode: str = "single",
    crop: int = 0,
    stride: int = 0,
    precision: str = "fp32",
    window_batch: int = 32,
) -> torch.Tensor:
    """Dense features of one image already at its processing size: (H, W, 3) uint8 -> (1, H/p, W/p, D) float32.

    ``single``: one forward pass; ``sliding``: the sliding-window teacher (crop/stride; 0 = native crop,
    stride 24 px).
    """
    dev = bb.mean.device
    x = bb.normalize(torch.tensor(np.ascontiguousarray(img))[None].to(dev))  # (1, 3, H, W)
    if mode == "single":
        with autocast(dev, precision):
            return bb.dense(x).float()  # (1, H/p, W/p, D)
    from spar_core.sliding import sliding_window_features

    crop = crop or bb.native_size
    stride = stride or default_stride(crop)
    return sliding_window_features(
        bb, x, crop=crop, stride=stride, window_batch=window_batch, autocast_dtype=autocast_dtype(precision)
    ).float()


# ---------------------------------------------------------------------------------------------- classes


def resolve_classes(classes: str = "", classes_file: str = "") -> list[list[str]]:
    """Class list from ``--classes "a,b;c"`` or ``--classes-file F`` (exactly one)."""
    if classes and classes_file:
        raise ClassNamesError("give either --classes or --classes-file, not both")
    if classes_file:
        return read_class_file(classes_file)
    if not classes.strip():
        raise ClassNamesError(
            "the class list is empty: give --classes 'sky,clouds;road;...' or --classes-file"
        )
    return parse_class_text(classes, source="--classes")


def build_text_classifier(bb, classes: list[list[str]], templates: str = "imagenet"):
    """spar_core's text classifier; ``templates='simple'`` uses the single prompt 'a photo of a {}.'."""
    from spar_core.segment import build_classifier

    tmpl = None if templates == "imagenet" else [lambda c: f"a photo of a {c}."]
    with torch.no_grad():
        return build_classifier(bb, classes, templates=tmpl)


# ---------------------------------------------------------------------------------------------- drawing


def make_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours: the PASCAL VOC bit-interleaved palette (index 0 black is replaced)."""
    pal = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0  # skip VOC's black for class 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal[:n]


def label_png(label: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Label map (H, W) -> PNG image whose pixel values are the class indices.

    Palette mode ('P', coloured by ``palette``) when indices fit in a byte, else 16-bit grayscale.
    """
    if label.max(initial=0) < 256:
        im = Image.fromarray(label.astype(np.uint8), mode="P")
        flat = np.zeros((256, 3), np.uint8)
        flat[: len(palette)] = palette[:256]
        flat[255] = (255, 255, 255)
        im.putpalette(flat.reshape(-1).tolist())
        return im
    return Image.fromarray(label.astype(np.uint16))


def overlay(
    img: np.ndarray,
    label: np.ndarray,
    names: list[str],
    palette: np.ndarray,
    alpha: float = 0.5,
    legend: bool = True,
) -> Image.Image:
    """Blend a colour-coded label map over the image (same size as the image), with a legend of the classes
    present (largest first) drawn in the top-left corner. Label 255 (ignore) is left uncoloured."""
    valid = label != 255
    colours = palette[np.where(valid, label, 0)]  # (H, W, 3)
    out = img.astype(np.float32)
    out[valid] = (1 - alpha) * out[valid] + alpha * colours[valid]
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if legend:
        _draw_legend(im, label, names, palette)
    return im


def _draw_legend(im: Image.Image, label: np.ndarray, names: list[str], palette: np.ndarray) -> None:
    ids, counts = np.unique(label[label != 255], return_counts=True)
    order = ids[np.argsort(-counts)]
    if len(order) == 0:
        return
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(im, "RGBA")
    line = 12
    width = min(im.width, 16 + 7 * max(len(names[i]) for i in order))
    height = min(im.height, 4 + line * len(order))
    draw.rectangle([0, 0, width, height], fill=(0, 0, 0, 150))
    for row, cls in enumerate(order):
        y = 2 + row * line
        if y + line > im.height:
            break
        draw.rectangle([2, y + 1, 10, y + 9], fill=tuple(int(c) for c in palette[cls]) + (255,))
        draw.text((14, y), names[cls], fill=(255, 255, 255, 255), font=font)


# ---------------------------------------------------------------------------------------------- file names


def safe_stem(name: str, used: set[str] | None = None) -> str:
    """A file-name stem derived from an input path that cannot escape the output folder.

    Keeps ``[A-Za-z0-9._-]`` of the base name (others -> '_'), strips leading dots, never empty;
    with ``used``, appends ``-1``, ``-2``, ... until unique (and records the result).
    """
    base = Path(str(name).replace("\\", "/")).name
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")[:120] or "image"
    if used is not None:
        cand, k = stem, 1
        while cand.lower() in used:
            cand, k = f"{stem}-{k}", k + 1
        used.add(cand.lower())
        stem = cand
    return stem


def out_path(out_dir: Path, filename: str) -> Path:
    """``out_dir / filename``, refusing anything that would land outside ``out_dir``."""
    root = out_dir.resolve()
    p = (root / filename).resolve()
    if p.parent != root:
        raise InferenceError(f"refusing to write outside {root}: {filename!r}")
    return p


# ---------------------------------------------------------------------------------------------- commands


@dataclass
class SegmentConfig:
    """``spar segment``: open-vocabulary segmentation of photos."""

    classes: str = ""
    classes_file: str = ""
    checkpoint: str = ""
    backbone: str = ""
    pretrained: str = ""
    out: str = "segment-out"
    short_side: int = 672  # 0 = keep the image's scale
    long_side: int = 2048
    mode: Literal["single", "sliding"] = "single"
    crop: int = 0  # 0 = backbone's native size
    stride: int = 0  # 0 = 24 px (the paper's teacher stride at every crop)
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float = 0.0
    templates: Literal["imagenet", "simple"] = "imagenet"
    precision: Precision = "fp32"
    device: str = "auto"
    alpha: float = 0.5
    window_batch: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        _check_common(self)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class EmbedConfig:
    """``spar embed``: dense features of photos as .npy plus shape metadata."""

    checkpoint: str = ""
    backbone: str = ""
    pretrained: str = ""
    out: str = "embed-out"
    short_side: int = 0  # 0 = keep the image's scale (snapped to the patch size)
    long_side: int = 2048
    mode: Literal["single", "sliding"] = "single"
    crop: int = 0  # 0 = backbone's native size
    stride: int = 0  # 0 = 24 px (the paper's teacher stride at every crop)
    dtype: Literal["float32", "float16"] = "float32"
    precision: Precision = "fp32"
    device: str = "auto"
    window_batch: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        _check_common(self)


def _check_common(cfg) -> None:
    for k in ("short_side", "long_side", "crop", "stride", "window_batch"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.window_batch == 0:
        raise ConfigError("window_batch must be >= 1")


def segment_images(images: list[str], cfg: SegmentConfig) -> list[dict[str, object]]:
    """Segment each image; writes ``<stem>_overlay.png`` and ``<stem>_labels.png`` (input size) to ``cfg.out``
    plus ``classes.json``. Returns one record per image (paths, classes present)."""
    if not images:
        raise InferenceError("no input images given")
    classes = resolve_classes(cfg.classes, cfg.classes_file)
    photos = [(p, read_photo(p)) for p in images]  # read all first: fail before any work
    dev = pick_device(cfg.device)
    bb = load_model(cfg.checkpoint, cfg.backbone, cfg.pretrained, dev, cfg.seed)
    clf = build_text_classifier(bb, classes, cfg.templates)
    from spar_core.segment import predict

    out_dir = Path(cfg.out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [c[0] for c in classes]
    pal = make_palette(len(classes))
    used: set[str] = set()
    records = []
    for path, img in photos:
        h, w = img.shape[:2]
        x, size = model_input(img, cfg.short_side, cfg.long_side, bb.patch_size)
        feats = dense_features(bb, x, cfg.mode, cfg.crop, cfg.stride, cfg.precision)
        with torch.no_grad():
            pred = (
                predict(
                    feats,
                    clf,
                    out_size=(h, w),
                    logit_scale=cfg.logit_scale,
                    prob_thd=cfg.prob_thd,
                    area_thd=cfg.area_thd,
                )[0]
                .cpu()
                .numpy()
            )  # (H, W)
        stem = safe_stem(path, used)
        ov, lab = out_path(out_dir, f"{stem}_overlay.png"), out_path(out_dir, f"{stem}_labels.png")
        overlay(img, pred, names, pal, cfg.alpha).save(ov)
        label_png(pred, pal).save(lab)
        ids, counts = np.unique(pred, return_counts=True)
        records.append(
            {
                "image": str(path),
                "overlay": str(ov),
                "labels": str(lab),
                "size": [h, w],
                "resized_size": list(size),
                "processed_size": list(x.shape[:2]),
                "classes_present": {
                    names[i]: round(c / pred.size, 4)
                    for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
                },
            }
        )
    meta = {
        "classes": classes,
        "palette": pal.tolist(),
        **model_identity(bb),
        "mode": cfg.mode,
        "images": records,
    }
    out_path(out_dir, "classes.json").write_text(json.dumps(meta, indent=1))
    return records


def embed_images(images: list[str], cfg: EmbedConfig) -> list[dict[str, object]]:
    """Dense features per image: ``<stem>.npy`` (h, w, D) and ``<stem>.json`` (shape metadata) in ``cfg.out``."""
    if not images:
        raise InferenceError("no input images given")
    photos = [(p, read_photo(p)) for p in images]
    dev = pick_device(cfg.device)
    bb = load_model(cfg.checkpoint, cfg.backbone, cfg.pretrained, dev, cfg.seed)
    out_dir = Path(cfg.out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    records = []
    for path, img in photos:
        h, w = img.shape[:2]
        x, size = model_input(img, cfg.short_side, cfg.long_side, bb.patch_size)
        crop = (cfg.crop or bb.native_size) if cfg.mode == "sliding" else None
        stride = (cfg.stride or default_stride(crop)) if crop is not None else None
        feats = dense_features(bb, x, cfg.mode, crop or 0, stride or 0, cfg.precision)
        arr = feats[0].cpu().numpy().astype(cfg.dtype)  # (h, w, D)
        stem = safe_stem(path, used)
        npy, js = out_path(out_dir, f"{stem}.npy"), out_path(out_dir, f"{stem}.json")
        np.save(npy, arr, allow_pickle=False)
        meta = {
            "image": str(path),
            "features": npy.name,
            "shape": list(arr.shape),
            "dtype": cfg.dtype,
            "layout": "(h, w, D) row-major; h = processed_height / patch_size; feature (i, j) covers "
            "processed pixels [i*p, (i+1)*p) x [j*p, (j+1)*p), the top-left of the resized image",
            "input_size": [h, w],
            "resized_size": list(size),
            "processed_size": list(x.shape[:2]),
            "mode": cfg.mode,
            "crop": crop,
            "stride": stride,
            **model_identity(bb),
        }
        js.write_text(json.dumps(meta, indent=1))
        records.append(meta)
    return records


# ---------------------------------------------------------------------------------------------- CLI


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="student checkpoint directory")
    p.add_argument("--backbone", help="named backbone (single-pass baseline), e.g. maskclip-vit-b16")
    p.add_argument("--pretrained", help="open_clip pretrained tag or local weights file for --backbone")
    p.add_argument("--short-side", dest="short_side", type=int)
    p.add_argument("--long-side", dest="long_side", type=int)
    p.add_argument("--mode", choices=["single", "sliding"])
    p.add_argument("--crop", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--window-batch", dest="window_batch", type=int)
    p.add_argument("--out", help="output folder")
    p.add_argument("--config", help="TOML recipe file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def config_from_args(cls, args: argparse.Namespace, section: str):
    """Load a stage config: TOML recipe + --set overrides, then explicit CLI flags on top."""
    cfg = load_config(
        cls, getattr(args, "config", None), list(getattr(args, "set", []) or []), section=section
    )
    names = {f.name for f in fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return apply_overrides(cfg, given) if given else cfg


def _cmd_segment(args: argparse.Namespace) -> int:
    cfg = config_from_args(SegmentConfig, args, "segment")
    recs = segment_images(args.images, cfg)
    for r in recs:
        top = ", ".join(
            f"{k} {v:.0%}" for k, v in sorted(r["classes_present"].items(), key=lambda kv: -kv[1])[:5]
        )
        print(f"{r['image']} -> {r['overlay']}, {r['labels']}  [{top}]")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    cfg = config_from_args(EmbedConfig, args, "embed")
    for r in embed_images(args.images, cfg):
        print(f"{r['image']} -> {Path(cfg.out) / r['features']} {tuple(r['shape'])} {r['dtype']}")
    return 0


def add_inference_cli(subparsers) -> None:
    """Register ``segment`` and ``embed``."""
    p = subparsers.add_parser(
        "segment", help="open-vocabulary segmentation of images (overlay + label map PNGs)"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "--classes", help='classes separated by ";", synonyms by ",": "sky,clouds;road;person,people"'
    )
    p.add_argument("--classes-file", dest="classes_file", help="one class per line, synonyms comma-separated")
    p.add_argument("--logit-scale", dest="logit_scale", type=float)
    p.add_argument("--prob-thd", dest="prob_thd", type=float)
    p.add_argument("--area-thd", dest="area_thd", type=float)
    p.add_argument("--templates", choices=["imagenet", "simple"])
    p.add_argument("--alpha", type=float, help="overlay opacity")
    _add_model_args(p)
    p.set_defaults(func=_cmd_segment)

    e = subparsers.add_parser("embed", help="dense features of images as .npy with shape metadata (JSON)")
    e.add_argument("images", nargs="+", metavar="IMAGE")
    e.add_argument("--dtype", choices=["float32", "float16"])
    _add_model_args(e)
    e.set_defaults(func=_cmd_embed)
