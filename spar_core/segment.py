"""Open-vocabulary segmentation from dense features (DESIGN §2 "Open-vocabulary segmentation").

Class names (one entry per class, synonyms comma-separated) are embedded with open_clip's ImageNet prompt
templates; pixel logits are ``logit_scale * cos(feature, text)``, upsampled bilinearly to the label size and
softmaxed over all names; a class scores the max over its synonyms; pixels whose top probability is below
``prob_thd`` become class 0 (background); classes covering less than ``area_thd`` of the image are suppressed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES

from spar_core.backbones import Backbone

__all__ = ["ClassListError", "parse_classes", "TextClassifier", "build_classifier", "class_logits", "predict"]


class ClassListError(ValueError):
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
    feats: torch.Tensor, clf: TextClassifier, out_size: tuple[int, int], logit_scale: float = 40.0
) -> torch.Tensor:
    """Per-class probabilities at ``out_size``: (B, h, w, D) -> (B, C, H, W) (max over synonyms of the softmax)."""
    f = F.normalize(feats.float(), dim=-1)
    w = clf.weights.to(f.device)
    logits = logit_scale * torch.einsum("bhwd,nd->bnhw", f, w)  # (B, N_names, h, w)
    logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    probs = logits.softmax(dim=1)  # (B, N_names, H, W)
    b, _, h, wd = probs.shape
    owner = clf.name_to_class.to(f.device)
    out = torch.full((b, clf.num_classes, h, wd), -1.0, device=f.device)
    idx = owner.view(1, -1, 1, 1).expand_as(probs)
    return out.scatter_reduce(1, idx, probs, reduce="amax", include_self=True)  # (B, C, H, W)


def predict(
    feats: torch.Tensor,
    clf: TextClassifier,
    out_size: tuple[int, int],
    logit_scale: float = 40.0,
    prob_thd: float = 0.0,
    area_thd: float = 0.0,
) -> torch.Tensor:
    """Label map (B, H, W) int64 from dense features (B, h, w, D).

    ``area_thd`` > 0: classes other than 0 whose predicted area is below that fraction of the image get their
    score zeroed before the final argmax. ``prob_thd`` > 0: pixels whose winning score is below it become class 0.
    """
    scores = class_logits(feats, clf, out_size, logit_scale)  # (B, C, H, W)
    pred = scores.argmax(1)  # (B, H, W)
    if area_thd > 0:
        c = clf.num_classes
        area = F.one_hot(pred, c).flatten(1, 2).float().mean(1)  # (B, C) fraction of the image
        keep = area >= area_thd
        keep[:, 0] = True
        scores = scores * keep[:, :, None, None]
        pred = scores.argmax(1)
    if prob_thd > 0:
        pred = torch.where(scores.max(1).values < prob_thd, torch.zeros_like(pred), pred)
    return pred
