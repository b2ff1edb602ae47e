"""Open-vocabulary segmentation from dense features.

Class names (one entry per class, synonyms comma-separated) are embedded with open_clip's ImageNet prompt
templates. Post-processing follows the authors' code (``segmentors/segmentor_vit.py`` at 0f63ff2, the SCLIP
family) step by step: cosine similarities upsampled bilinearly to the label size, ``logit_scale * cos +
logit_bias``, softmax over all names, a class scores the max over its synonyms; with ``area_thd``, every class
but 0 whose predicted area (pixels where it wins) is not *greater than* ``area_thd`` × the total predicted area
of the classes other than 0 gets its scores zeroed; then the argmax, and pixels whose top (remaining) score is
below ``prob_thd`` become class 0 (background).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES

from spar_core.backbones import Backbone
from spar_core.errors import InputError

__all__ = [
    "ClassListError",
    "parse_classes",
    "TextClassifier",
    "build_classifier",
    "class_logits",
    "postprocess",
    "predict",
]


class ClassListError(InputError):
    """A class list is empty, has an empty name or repeats a name."""


def parse_classes(spec: str | Sequence[str]) -> list[list[str]]:
    """Parse class names: a string with one class per line or per ';', or a list of lines; synonyms by ','.

    Returns one list of synonyms per class, in order. Raises :class:`ClassListError` on an empty list, an empty
    class or synonym, or a name that appears twice.
    """
    lines = spec.replace(";", "\n").splitlines() if isinstance(spec, str) else list(spec)
    lines = [ln for ln in (str(x).strip() for x in lines) if ln and not ln.startswith("#")]
    if not lines:
        raise ClassListError("the class list is empty")
    classes: list[list[str]] = []
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        names = [n.strip() for n in line.split(",")]
        if any(not n for n in names):
            raise ClassListError(f"class {i} ({line!r}) has an empty name")
        for n in names:
            key = n.lower()
            if key in seen:
                raise ClassListError(f"duplicate class name {n!r} (classes {seen[key]} and {i})")
            seen[key] = i
        classes.append(names)
    return classes


@dataclass
class TextClassifier:
    """Normalised text embeddings of every name and the class each name belongs to."""

    weights: torch.Tensor  # (N_names, D), unit norm
    name_to_class: torch.Tensor  # (N_names,) int64
    classes: list[list[str]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@torch.no_grad()
def build_classifier(
    backbone: Backbone,
    classes: list[list[str]] | str,
    templates: Sequence[Callable[[str], str]] | None = None,
) -> TextClassifier:
    """Embed each name with every template, normalise, average, normalise again."""
    if isinstance(classes, str):
        classes = parse_classes(classes)
    if not classes:
        raise ClassListError("the class list is empty")
    templates = list(templates) if templates is not None else list(OPENAI_IMAGENET_TEMPLATES)
    names = [n for syn in classes for n in syn]
    owners = [c for c, syn in enumerate(classes) for _ in syn]
    embs = []
    for name in names:
        e = backbone.encode_text([t(name) for t in templates])  # (T, D)
        e = F.normalize(e.float(), dim=-1).mean(0)
        embs.append(F.normalize(e, dim=-1))
    w = torch.stack(embs)  # (N_names, D)
    return TextClassifier(w, torch.tensor(owners, dtype=torch.long), [list(s) for s in classes])


def class_logits(
    feats: torch.Tensor,
    clf: TextClassifier,
    out_size: tuple[int, int],
    logit_scale: float = 40.0,
    logit_bias: float = 0.0,
) -> torch.Tensor:
    """Per-class probabilities at ``out_size``: (B, h, w, D) -> (B, C, H, W).

    In the reference's order: cosine similarity to every name, bilinear upsampling of the cosines
    (``align_corners=False``), ``logit_scale * cos + logit_bias``, softmax over all names, max over each
    class's synonyms.
    """
    f = F.normalize(feats.float(), dim=-1)
    w = clf.weights.to(f.device)
    cos = torch.einsum("bhwd,nd->bnhw", f, w)  # (B, N_names, h, w)
    cos = F.interpolate(cos, size=tuple(out_size), mode="bilinear", align_corners=False)  # (B, N, H, W)
    probs = (cos * logit_scale + logit_bias).softmax(dim=1)  # (B, N_names, H, W)
    b, _, h, wd = probs.shape
    owner = clf.name_to_class.to(f.device)
    out = torch.full((b, clf.num_classes, h, wd), -1.0, device=f.device)
    idx = owner.view(1, -1, 1, 1).expand_as(probs)
    return out.scatter_reduce(1, idx, probs, reduce="amax", include_self=True)  # (B, C, H, W)


def postprocess(scores: torch.Tensor, prob_thd: float = 0.0, area_thd: float = 0.0) -> torch.Tensor:
    """Label map (B, H, W) int64 from per-class scores (B, C, H, W), as the reference post-processes.

    ``area_thd`` > 0: a class other than 0 keeps its scores only if its predicted area (pixels where it is the
    argmax) is strictly greater than ``area_thd`` × the summed predicted area of all classes other than 0
    (not a fraction of the image; with no such pixels every class but 0 is zeroed). ``area_thd`` = 0 changes
    nothing (the reference's ``None``). Then the argmax; ``prob_thd`` > 0: pixels whose top remaining score is
    below it become class 0.
    """
    if area_thd > 0:
        c = scores.shape[1]
        won = F.one_hot(scores.argmax(1), c)  # (B, H, W, C)
        area = won[..., 1:].sum((1, 2))  # (B, C-1) pixels each foreground class wins
        keep = area.float() > area_thd * area.sum(1, keepdim=True).float()  # (B, C-1)
        mask = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)  # class 0 is never suppressed
        scores = scores * mask[:, :, None, None].to(scores.dtype)
    pred = scores.argmax(1)  # (B, H, W)
    if prob_thd > 0:
        pred = torch.where(scores.max(1).values < prob_thd, torch.zeros_like(pred), pred)
    return pred


def predict(
    feats: torch.Tensor,
    clf: TextClassifier,
    out_size: tuple[int, int],
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float = 0.0,
    logit_bias: float = 0.0,
) -> torch.Tensor:
    """Label map (B, H, W) int64 from dense features (B, h, w, D): :func:`class_logits` then
    :func:`postprocess` (``area_thd`` relative to the predicted foreground area, then ``prob_thd``)."""
    scores = class_logits(feats, clf, out_size, logit_scale, logit_bias)  # (B, C, H, W)
    return postprocess(scores, prob_thd=prob_thd, area_thd=area_thd)
