"""Pictures of dense features: ``spar viz`` and the PCA panels logged on fidelity runs.

Each panel shows one image and, side by side, the sliding-window teacher's, the single-pass baseline's and the
student's dense features mapped to RGB by the *same* 3-component PCA: the basis is fitted on the concatenation of
the three feature maps, so equal colours mean equal features across the three, and the student's map should look
like the teacher's, where the baseline's does not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.common import storage
from pipeline.common.errors import UserError
from pipeline.data.resize import resize_linear
from pipeline.eval.model import dense_features, load_model, protocol_size
from pipeline.eval.segment import published, read_photo, safe_stem
from pipeline.student.format import read_backbone_info
from spar_core.backbones import Backbone

__all__ = ["shared_pca_rgb", "pca_panel", "viz_images", "run_cli"]


class VizError(UserError):
    """Bad ``spar viz`` request."""


def shared_pca_rgb(maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Project every (h, w, D) map onto the top-3 principal components of all their rows together.

    Returns (h, w, 3) float arrays in [0, 1]: each component is scaled by its 1st..99th percentile over all maps
    (one scale for all, so the maps stay comparable).
    """
    if not maps:
        return {}
    dims = {m.shape[-1] for m in maps.values()}
    if len(dims) != 1:
        raise VizError(f"feature maps have different dims {sorted(dims)}; one PCA basis needs one dim")
    rows = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps.values()]).astype(np.float64)  # (N, D)
    mean = rows.mean(0)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)  # vt: (min(N, D), D)
    basis = np.zeros((3, rows.shape[1]))
    basis[: min(3, vt.shape[0])] = vt[:3]
    proj_all = (rows - mean) @ basis.T  # (N, 3)
    lo, hi = np.percentile(proj_all, 1, axis=0), np.percentile(proj_all, 99, axis=0)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    out = {}
    for name, m in maps.items():
        p = (m.reshape(-1, m.shape[-1]).astype(np.float64) - mean) @ basis.T  # (h*w, 3)
        out[name] = np.clip((p - lo) / span, 0.0, 1.0).reshape(*m.shape[:2], 3)
    return out


def pca_panel(img: np.ndarray, maps: dict[str, np.ndarray], tile: int = 256) -> Image.Image:
    """One row: the image, then each map in a shared PCA colouring, each scaled to ``tile`` pixels high."""
    rgb = shared_pca_rgb(maps)
    h, w = img.shape[:2]
    tw = max(1, round(w * tile / h))
    tiles = [("image", Image.fromarray(img).resize((tw, tile), Image.BILINEAR))]
    for name, m in rgb.items():
        tiles.append(
            (name, Image.fromarray((m * 255).round().astype(np.uint8)).resize((tw, tile), Image.NEAREST))
        )
    pad, head = 6, 18
    panel = Image.new("RGB", (len(tiles) * (tw + pad) + pad, tile + head + pad), "white")
    draw = ImageDraw.Draw(panel)
    for i, (name, t) in enumerate(tiles):
        x = pad + i * (tw + pad)
        panel.paste(t, (x, head))
        draw.text((x + 2, 3), name, fill="black")
    return panel


def _features(bb: Backbone, img: np.ndarray, mode: str, crop: int = 0, stride: int = 0) -> np.ndarray:
    return dense_features(bb, img, mode, crop, stride)[0].cpu().numpy()  # (h, w, D)


def viz_images(
    images: list[str], checkpoint: str, out: str, short_side: int = 448, crop: int = 0, stride: int = 0
) -> list[str]:
    """PCA panels (image | teacher | baseline | student) of photo files (local or URLs) into the folder ``out``
    (local or a URL); the teacher is computed here. Returns where the panels are."""
    if not images:
        raise VizError("no input images given")
    photos = [(p, read_photo(p)) for p in images]
    student = load_model(checkpoint=checkpoint)
    info = read_backbone_info(checkpoint)
    base = load_model(
        backbone=info["name"], pretrained=info.get("pretrained") or "", seed=int(info.get("seed", 0))
    )
    written, used = [], set()
    with storage.staged_dir(out) as staged:
        for path, img in photos:
            size = protocol_size(*img.shape[:2], short_side, 0, base.patch_size)
            x = resize_linear(img, size)
            maps = {
                "teacher (sliding)": _features(base, x, "sliding", crop, stride),
                "baseline (single pass)": _features(base, x, "single"),
                "student": _features(student, x, "single"),
            }
            target = Path(staged) / f"{safe_stem(path, used)}_pca.png"
            pca_panel(x, maps).save(target)
            written.append(published(out, target))
    return written


def run_cli(args: argparse.Namespace) -> int:
    """``spar viz``: write the PCA panels of the photos, print their paths."""
    paths = viz_images(
        args.images, args.checkpoint, args.out, args.short_side, args.crop or 0, args.stride or 0
    )
    for p in paths:
        print(p)
    return 0
