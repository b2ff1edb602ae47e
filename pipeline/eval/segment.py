"""``spar segment`` and ``spar embed``: photo files in, pictures and arrays out.

segment: photo -> model input -> dense features -> labels at the photo's size -> ``<stem>_overlay.png`` (colours
over the photo, with a legend) and ``<stem>_labels.png`` (class indices), plus ``classes.json``.
embed: photo -> model input -> dense features -> ``<stem>.npy`` (h, w, D) and ``<stem>.json`` (shape metadata).
Photos and the output folder may be local or any fsspec URL (outputs to a URL are written locally, then copied).
Also the drawing the benchmark reuses (palette, overlay, label PNG) and safe output names.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.common import storage
from pipeline.common.config import config_from_cli
from pipeline.eval.config import EmbedConfig, SegmentConfig
from pipeline.eval.model import (
    InferenceError,
    build_text_classifier,
    dense_features,
    label_map,
    load_model,
    model_identity,
    model_input,
    pick_device,
    resolve_classes,
)
from spar_core.sliding import default_stride

# ---------------------------------------------------------------------------------------------- files


def read_photo(path: str | Path) -> np.ndarray:
    """Read a photo (a local file or a URL) as (H, W, 3) uint8 RGB, honouring EXIF orientation; clear error when
    missing or unreadable."""
    if not storage.is_local(str(path)):
        p: str | Path = str(path)
        try:
            raw = storage.read_bytes(p)
        except OSError as e:
            raise InferenceError(f"cannot read image {p}: {e}") from e
        if raw is None:
            raise InferenceError(f"image not found: {p}")
        src: str | Path | io.BytesIO = io.BytesIO(raw)
    else:
        p = src = Path(storage.local_path(str(path))).expanduser()
        if not p.is_file():
            raise InferenceError(f"image not found: {p}")
    try:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise InferenceError(f"cannot read image {p}: {e}") from e


def safe_stem(name: str, used: set[str]) -> str:
    """A file-name stem derived from an input path that cannot escape the output folder.

    Keeps ``[A-Za-z0-9._-]`` of the base name (others -> '_'), strips leading dots, never empty; appends ``-1``,
    ``-2``, ... until unique in ``used`` (case-insensitively; the result is added to it).
    """
    base = Path(str(name).replace("\\", "/")).name
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")[:120] or "image"
    cand, k = stem, 1
    while cand.lower() in used:
        cand, k = f"{stem}-{k}", k + 1
    used.add(cand.lower())
    return cand


def out_path(out_dir: Path, filename: str) -> Path:
    """``out_dir / filename``, refusing anything that would land outside ``out_dir``."""
    root = out_dir.resolve()
    p = (root / filename).resolve()
    if p.parent != root:
        raise InferenceError(f"refusing to write outside {root}: {filename!r}")
    return p


def published(out: str, written: Path) -> str:
    """Where a file written into the staged folder of ``out`` ends up: itself for a local ``out``, else
    ``<out URL>/<name>``."""
    return str(written) if storage.is_local(out) else storage.join(out, written.name)


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
) -> Image.Image:
    """Blend a colour-coded label map over the image (same size as the image), with a legend of the classes
    present (largest first) drawn in the top-left corner. Label 255 (ignore) is left uncoloured."""
    valid = label != 255
    colours = palette[np.where(valid, label, 0)]  # (H, W, 3)
    out = img.astype(np.float32)
    out[valid] = (1 - alpha) * out[valid] + alpha * colours[valid]
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
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


# ---------------------------------------------------------------------------------------------- segment


def segment_images(images: list[str], cfg: SegmentConfig) -> list[dict[str, object]]:
    """Segment each image; writes ``<stem>_overlay.png`` and ``<stem>_labels.png`` (input size) to ``cfg.out``
    plus ``classes.json``. Returns one record per image (paths, classes present)."""
    if not images:
        raise InferenceError("no input images given")
    classes = resolve_classes(cfg.classes, cfg.classes_file)
    photos = [(p, read_photo(p)) for p in images]  # read all first: fail before any work
    bb = load_model(cfg.checkpoint, cfg.backbone, cfg.pretrained, pick_device(cfg.device), cfg.seed)
    clf = build_text_classifier(bb, classes, cfg.templates)
    names = [c[0] for c in classes]
    pal = make_palette(len(classes))
    used: set[str] = set()
    records = []
    opts = {
        k: getattr(cfg, k)
        for k in ("mode", "crop", "stride", "precision", "logit_scale", "prob_thd", "area_thd")
    }
    with storage.staged_dir(cfg.out) as staged:
        out_dir = Path(staged)
        for path, img in photos:
            x, size = model_input(img, cfg.short_side, cfg.long_side, bb.patch_size)
            pred = label_map(bb, clf, x, img.shape[:2], **opts).cpu().numpy()  # (H, W)
            stem = safe_stem(str(path), used)
            ov, lab = out_path(out_dir, f"{stem}_overlay.png"), out_path(out_dir, f"{stem}_labels.png")
            overlay(img, pred, names, pal, cfg.alpha).save(ov)
            label_png(pred, pal).save(lab)
            ids, counts = np.unique(pred, return_counts=True)
            present = {
                names[i]: round(c / pred.size, 4) for i, c in zip(ids.tolist(), counts.tolist(), strict=True)
            }
            records.append(
                {
                    "image": str(path),
                    "overlay": published(cfg.out, ov),
                    "labels": published(cfg.out, lab),
                    "size": list(img.shape[:2]),
                    "resized_size": list(size),
                    "processed_size": list(x.shape[:2]),
                    "classes_present": present,
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


# ---------------------------------------------------------------------------------------------- embed


def embed_images(images: list[str], cfg: EmbedConfig) -> list[dict[str, object]]:
    """Dense features per image: ``<stem>.npy`` (h, w, D) and ``<stem>.json`` (shape metadata) in ``cfg.out``."""
    if not images:
        raise InferenceError("no input images given")
    photos = [(p, read_photo(p)) for p in images]
    bb = load_model(cfg.checkpoint, cfg.backbone, cfg.pretrained, pick_device(cfg.device), cfg.seed)
    crop = (cfg.crop or bb.native_size) if cfg.mode == "sliding" else None
    stride = (cfg.stride or default_stride(crop)) if crop is not None else None
    used: set[str] = set()
    records = []
    with storage.staged_dir(cfg.out) as staged:
        out_dir = Path(staged)
        for path, img in photos:
            x, size = model_input(img, cfg.short_side, cfg.long_side, bb.patch_size)
            feats = dense_features(bb, x, cfg.mode, crop or 0, stride or 0, cfg.precision)  # (1, h, w, D)
            arr = feats[0].cpu().numpy().astype(cfg.dtype)  # (h, w, D)
            stem = safe_stem(str(path), used)
            npy, js = out_path(out_dir, f"{stem}.npy"), out_path(out_dir, f"{stem}.json")
            np.save(npy, arr, allow_pickle=False)
            meta = {
                "image": str(path),
                "features": npy.name,
                "shape": list(arr.shape),
                "dtype": cfg.dtype,
                "layout": "(h, w, D) row-major; h = processed_height / patch_size; feature (i, j) covers "
                "processed pixels [i*p, (i+1)*p) x [j*p, (j+1)*p), the top-left of the resized image",
                "input_size": list(img.shape[:2]),
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


# ---------------------------------------------------------------------------------------------- commands


def run_segment_cli(args: argparse.Namespace) -> int:
    """``spar segment``: segment the photos, print one line per photo (outputs and the largest classes)."""
    cfg = config_from_cli(SegmentConfig, args, "segment")
    for r in segment_images(args.images, cfg):
        present = sorted(r["classes_present"].items(), key=lambda kv: -kv[1])[:5]
        top = ", ".join(f"{k} {v:.0%}" for k, v in present)
        print(f"{r['image']} -> {r['overlay']}, {r['labels']}  [{top}]")
    return 0


def run_embed_cli(args: argparse.Namespace) -> int:
    """``spar embed``: write the photos' dense features, print one line per photo."""
    cfg = config_from_cli(EmbedConfig, args, "embed")
    for r in embed_images(args.images, cfg):
        print(f"{r['image']} -> {storage.join(cfg.out, r['features'])} {tuple(r['shape'])} {r['dtype']}")
    return 0
