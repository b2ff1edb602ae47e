"""The model side of every evaluation: which model (a student checkpoint or a named backbone) on which device,
what it sees (an (H, W, 3) photo resized as the authors' protocol, then cut to whole patches) and what comes out
(dense features, single pass or sliding window; a text classifier over a class list).

An image's path through an evaluation: photo -> :func:`model_input` (keep-ratio resize, :func:`patch_crop`) ->
:func:`dense_features` (1, h, w, D) -> ``spar_core.segment.predict`` with :func:`build_text_classifier` -> labels.
Precision (autocast) comes from :mod:`pipeline.common.precision` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common.config import ConfigError
from pipeline.common.errors import UserError
from pipeline.common.precision import autocast, autocast_dtype
from pipeline.common.storage import is_local, local_path
from pipeline.data.datasets import ClassNamesError, parse_class_text, read_class_file
from pipeline.data.resize import resize_linear
from pipeline.eval.config import (
    PAPER_AREA_THD,
    PAPER_LOGIT_SCALE,
    PAPER_PROB_THD,
    PAPER_SIZES,
    BenchmarkConfig,
)
from pipeline.student.format import CheckpointError, load_student
from spar_core.backbones import Backbone, BackboneError, build_backbone
from spar_core.segment import TextClassifier, build_classifier, predict
from spar_core.sliding import default_stride, sliding_window_features


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


def load_model(
    checkpoint: str = "",
    backbone: str = "",
    pretrained: str = "",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Backbone:
    """A Backbone from a student checkpoint (a local directory or a URL) or a named backbone (baseline/teacher).

    Exactly one of ``checkpoint`` and ``backbone`` must be given.
    """
    if bool(checkpoint) == bool(backbone):
        raise InferenceError("give exactly one of --checkpoint CKPT or --backbone NAME")
    if checkpoint:
        ckpt = checkpoint  # a URL (s3://...) is downloaded and verified by load_student
        if is_local(checkpoint):
            ckpt = str(Path(local_path(checkpoint)).expanduser())
            if not Path(ckpt).is_dir():
                raise InferenceError(f"checkpoint directory not found: {ckpt}")
        try:
            return load_student(ckpt, device=device)
        except CheckpointError as e:
            raise InferenceError(str(e)) from e
    try:
        return build_backbone(backbone, pretrained or None, device=device, seed=seed)
    except (BackboneError, FileNotFoundError) as e:
        raise InferenceError(f"cannot build backbone {backbone!r}: {e}") from e


def model_identity(bb: Backbone) -> dict[str, object]:
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


def synchronize(dev: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures the work itself (a no-op on CPU)."""
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------- model input


def protocol_size(h: int, w: int, short_side: int, long_side: int, multiple: int = 1) -> tuple[int, int]:
    """Size after mmseg's ``Resize(scale=(long_side, short_side), keep_ratio=True)`` (mmcv ``rescale_size``):
    scale ``s = min(long_side / max(h, w), short_side / min(h, w))``, each side ``int(side * s + 0.5)``.

    ``short_side=0`` keeps the scale (only the long-side cap applies, never upscaling); ``long_side=0`` means no
    cap. A side below ``multiple`` is raised to it (at least one patch). The model then sees the top-left
    ``floor(side / patch) * patch`` pixels (:func:`patch_crop`), as the reference's strided patch embedding does.
    """
    scales = [short_side / min(h, w) if short_side > 0 else 1.0]  # short_side 0: never upscale
    if long_side > 0:
        scales.append(long_side / max(h, w))
    s = min(scales)
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
    """The protocol's model input of an (H, W, 3) uint8 photo: resized as mmseg's keep-ratio ``Resize`` (bilinear
    with half-pixel centres, no antialias, as the reference's cv2 ``INTER_LINEAR``:
    :func:`pipeline.data.resize.resize_linear`), then :func:`patch_crop`. Returns (pixels, resized size)."""
    size = protocol_size(img.shape[0], img.shape[1], short_side, long_side, patch)
    return patch_crop(resize_linear(img, size), patch), size


# ---------------------------------------------------------------------------------------------- features


@torch.no_grad()
def dense_features(
    bb: Backbone,
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
    crop = crop or bb.native_size
    stride = stride or default_stride(crop)
    return sliding_window_features(
        bb, x, crop=crop, stride=stride, window_batch=window_batch, autocast_dtype=autocast_dtype(precision)
    ).float()


@torch.no_grad()
def label_map(
    bb: Backbone,
    clf: TextClassifier,
    x: np.ndarray,
    out_size: tuple[int, int],
    *,
    mode: str = "single",
    crop: int = 0,
    stride: int = 0,
    precision: str = "fp32",
    window_batch: int = 32,
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float = 0.0,
) -> torch.Tensor:
    """Label map (H, W) at ``out_size`` of the model input ``x`` (h', w', 3) uint8: :func:`dense_features`, then
    ``spar_core.segment.predict`` (cosine logits, upsampling, thresholds). Stays on the model's device."""
    feats = dense_features(bb, x, mode, crop, stride, precision, window_batch)  # (1, h, w, D)
    pred = predict(
        feats, clf, out_size=out_size, logit_scale=logit_scale, prob_thd=prob_thd, area_thd=area_thd
    )  # (1, H, W)
    return pred[0]


# ---------------------------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class EvalProtocol:
    """The resolved evaluation protocol for one dataset and backbone."""

    short_side: int
    long_side: int
    logit_scale: float
    prob_thd: float
    area_thd: float
    mode: str
    crop: int
    stride: int


def resolve_protocol(cfg: BenchmarkConfig, readout: str, native_size: int, patch: int) -> EvalProtocol:
    """Fill the authors' per-dataset, per-backbone-family defaults into the fields left at None."""
    ds = cfg.dataset
    # the protocol's two columns: "clip" for the MaskCLIP readout (CLIP towers), "siglip2" otherwise (DINOv3
    # dino.txt's readouts take the non-CLIP column, as the reference's configs/dinov3txt do)
    fam = "clip" if readout == "maskclip" else "siglip2"
    paper_short, paper_long = PAPER_SIZES.get(ds, (672, 2048))
    short = cfg.short_side if cfg.short_side is not None else paper_short
    long = cfg.long_side if cfg.long_side is not None else paper_long
    scale = cfg.logit_scale if cfg.logit_scale is not None else PAPER_LOGIT_SCALE.get(ds, 40.0)
    prob = cfg.prob_thd if cfg.prob_thd is not None else PAPER_PROB_THD.get((ds, fam), 0.0)
    area = cfg.area_thd if cfg.area_thd is not None else PAPER_AREA_THD.get((ds, fam), 0.0)
    crop = cfg.crop or native_size
    if crop % patch:
        raise ConfigError(f"crop {crop} is not a multiple of the patch size {patch}")
    stride = cfg.stride or default_stride(crop)
    return EvalProtocol(short, long, float(scale), float(prob), float(area), cfg.mode, crop, stride)


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


def build_text_classifier(
    bb: Backbone, classes: list[list[str]], templates: str = "imagenet"
) -> TextClassifier:
    """spar_core's text classifier; ``templates='simple'`` uses the single prompt 'a photo of a {}.'."""
    tmpl = None if templates == "imagenet" else [lambda c: f"a photo of a {c}."]
    return build_classifier(bb, classes, templates=tmpl)  # under no_grad
