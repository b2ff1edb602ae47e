"""Segmentation post-processing against a re-implementation of the authors' code (0 pixels different).

``reference_postprocess`` is written from ``segmentors/segmentor_vit.py`` (naomikombol/SPAR at 0f63ff2,
``forward_feature`` with ``name_path`` and ``postprocess_result``), step by step in its own order: cosine logits
upsampled to the label size, ``* logit_scale + logit_bias``, softmax over all names, per-class max over
synonyms via a one-hot (num_cls x num_queries) mask, then ``area_thd`` (area of each non-background class > thd
x the summed predicted foreground area, else its scores are zeroed), the argmax, and ``prob_thd``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spar_core import TextClassifier
from spar_core.segment import class_logits, postprocess, predict


def reference_postprocess(
    feats: torch.Tensor,  # (1, h, w, D) dense features
    query_features: torch.Tensor,  # (num_queries, D) unit text embeddings
    query_idx: list[int],  # class of each query
    out_size: tuple[int, int],
    logit_scale: float,
    prob_thd: float,
    area_thd: float | None,
    logit_bias: float = 0.0,
) -> np.ndarray:
    image_features = feats / feats.norm(dim=-1, keepdim=True)
    logits = (image_features @ query_features.T).permute(0, 3, 1, 2)  # (1, Q, h, w)
    seg_logits = F.interpolate(logits, size=out_size, mode="bilinear")[0]  # (Q, H, W)
    seg_logits = seg_logits * logit_scale + logit_bias
    seg_logits = seg_logits.softmax(0)
    idx = torch.tensor(query_idx, dtype=torch.int64)
    num_cls, num_queries = int(max(query_idx)) + 1, len(query_idx)
    if num_cls != num_queries:
        seg_logits = seg_logits.unsqueeze(0)
        cls_index = F.one_hot(idx).to(query_features).T.view(num_cls, num_queries, 1, 1)
        seg_logits = (seg_logits * cls_index).max(1)[0]
    if area_thd is not None:
        predictions = F.one_hot(seg_logits.argmax(0), num_cls).to(torch.float)
        area_pred = predictions[:, :, 1:].sum((0, 1), keepdim=True)
        area_pred = (area_pred > area_thd * area_pred.sum()).to(seg_logits.dtype)
        seg_logits[1:] *= area_pred.transpose(0, -1)
    seg_pred = seg_logits.argmax(0, keepdim=True)
    seg_pred[seg_logits.max(0, keepdim=True)[0] < prob_thd] = 0
    return seg_pred[0].numpy()


def reference_from_scores(scores: np.ndarray, prob_thd: float, area_thd: float | None) -> np.ndarray:
    """The reference's area/prob steps alone, in NumPy, on per-class scores (C, H, W)."""
    s = scores.copy()
    c = s.shape[0]
    if area_thd is not None:
        won = np.eye(c)[s.argmax(0)]  # (H, W, C)
        area = won[:, :, 1:].sum((0, 1))
        keep = (area > area_thd * area.sum()).astype(s.dtype)
        s[1:] *= keep[:, None, None]
    pred = s.argmax(0)
    pred[s.max(0) < prob_thd] = 0
    return pred


def _case(seed: int, num_cls: int, extra_syn: int, h: int, w: int, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    owners = list(range(num_cls)) + torch.randint(0, num_cls, (extra_syn,), generator=g).tolist()
    q = F.normalize(torch.randn(len(owners), dim, generator=g), dim=-1)
    feats = torch.randn(1, h, w, dim, generator=g)
    clf = TextClassifier(q, torch.tensor(owners), [[f"c{i}"] for i in range(num_cls)])
    return feats, q, owners, clf


CASES = [  # (seed, classes, extra synonyms, feature grid, label size, logit scale, prob_thd, area_thd)
    (0, 21, 35, (7, 11), (97, 151), 65.0, 0.1, 0.1),  # VOC21 with CLIP: both thresholds, non-square
    (1, 21, 0, (5, 9), (61, 130), 65.0, 0.0, 0.1),  # one name per class (the reference skips the max)
    (2, 60, 25, (9, 6), (140, 83), 50.0, 0.1, None),  # Context60
    (3, 6, 4, (4, 5), (33, 50), 40.0, 0.0, 0.3),  # a large area_thd removes most classes
    (4, 4, 2, (3, 7), (17, 45), 5.0, 0.4, 0.25),  # soft logits: prob_thd bites
    (5, 3, 0, (6, 4), (31, 19), 40.0, 0.0, 0.0),  # area_thd 0 (the reference applies it; a no-op)
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_predict_equals_reference_pixel_for_pixel(case):
    seed, ncls, syn, (h, w), out, scale, pthd, athd = case
    feats, q, owners, clf = _case(seed, ncls, syn, h, w)
    ref = reference_postprocess(feats, q, owners, out, scale, pthd, athd)
    got = predict(feats, clf, out, logit_scale=scale, prob_thd=pthd, area_thd=athd or 0.0)[0].numpy()
    assert got.shape == out
    assert int((got != ref).sum()) == 0
    if athd:  # the threshold changed something, else the case proves nothing about it
        plain = predict(feats, clf, out, logit_scale=scale, prob_thd=pthd)[0].numpy()
        assert (plain != ref).any() or seed == 1


def test_area_threshold_is_relative_to_foreground_not_image():
    # 100 pixels: 80 background, 15 of class 1, 5 of class 2. Class 2 has 5% of the image but 25% of the
    # foreground: area_thd 0.1 keeps it (the old image-fraction rule dropped it); 0.3 drops it, and so class 1
    # (75% of the foreground) survives while class 2's pixels go to the next best class.
    scores = np.zeros((1, 3, 10, 10), np.float32)
    scores[0, 0] = 0.5
    lab = np.zeros((10, 10), int)
    lab.flat[:15] = 1
    lab.flat[15:20] = 2
    for c in (1, 2):
        scores[0, c][lab == c] = 0.9
    scores[0, 1][lab == 2] = 0.7  # runner-up for class 2's pixels
    t = torch.from_numpy(scores)
    assert (postprocess(t, area_thd=0.1)[0].numpy() == lab).all()
    want = np.where(lab == 2, 1, lab)
    assert (postprocess(t, area_thd=0.3)[0].numpy() == want).all()
    for thd in (0.1, 0.25, 0.3):  # 0.25: 5 > 0.25 * 20 is false (strict)
        np.testing.assert_array_equal(
            postprocess(t, area_thd=thd)[0].numpy(), reference_from_scores(scores[0], 0, thd)
        )
    assert (postprocess(t, area_thd=0.25)[0].numpy() == want).all()


def test_postprocess_edge_cases_equal_reference():
    rng = np.random.default_rng(0)
    # no foreground at all: every foreground class is zeroed, background stays
    s = rng.random((4, 13, 29)).astype(np.float32)
    s[0] += 1.0
    # ties: quantised scores make exact ties common (argmax takes the first)
    q = (rng.integers(0, 4, (5, 17, 23)) / 4).astype(np.float32)
    # a class tied exactly at the area threshold; random soft scores
    r = rng.random((6, 40, 25)).astype(np.float32)
    for scores in (s, q, r):
        for pthd, athd in [(0.0, None), (0.3, None), (0.0, 0.1), (0.5, 0.1), (0.2, 0.34), (0.0, 0.5)]:
            got = postprocess(torch.from_numpy(scores)[None], prob_thd=pthd, area_thd=athd or 0.0)[0].numpy()
            assert int((got != reference_from_scores(scores, pthd, athd)).sum()) == 0, (pthd, athd)


def test_class_logits_order_matches_reference_numerically():
    feats, q, owners, clf = _case(7, 5, 3, 6, 9)
    got = class_logits(feats, clf, (25, 37), logit_scale=40.0)[0]  # (C, H, W)
    f = feats / feats.norm(dim=-1, keepdim=True)
    cos = F.interpolate((f @ q.T).permute(0, 3, 1, 2), size=(25, 37), mode="bilinear")[0]
    probs = (cos * 40.0).softmax(0)
    want = torch.stack([probs[[i for i, o in enumerate(owners) if o == c]].max(0).values for c in range(5)])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
